"""COCO 2014 from the official instance annotations, as an 81-class semantic segmentation set.

    root/train2014/COCO_train2014_<12 digits>.jpg      root/val2014/...
    root/annotations/instances_train2014.json           root/annotations/instances_val2014.json

Semantic masks are painted once per image and cached as VOC-style index PNGs (0 = background,
1..80 = the official categories in ascending id order, 255 = ignore):
  * crowd regions (iscrowd=1) are 255: their outline is coarse and mixes objects with background;
  * instances are painted largest first, so small objects on top of large ones stay visible;
  * a crowd region still counts for the image-level label (the class is visibly present);
  * images without any annotation are left out of the split, like the usual WSSS COCO lists
    (82,081 train / 40,137 val images); `excluded_empty` says how many.
The cache is `<data.cache_dir or root/wsss_cache>/<train2014|val2014>/`, keyed by the annotation
file's size and modification time and by POLICY, so a changed file or policy never reuses stale masks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from wsss.data.base import SegDataset
from wsss.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from wsss.data.labels import strip_image_extension
from wsss.errors import DataError, RunDirError
from wsss.io import atomic, images
from wsss.io.paths import check_sample_id, safe_join

log = logging.getLogger(__name__)

POLICY = "v1: crowd=255, instances largest first, empty images excluded"
CAT_TO_CLASS = {cid: k + 1 for k, cid in enumerate(COCO_CATEGORY_IDS)}  # official id -> 1..80
SPLITS = {"train": "train2014", "train2014": "train2014", "val": "val2014", "val2014": "val2014"}


class COCODataset(SegDataset):
    """COCO 2014 train or val: image-level labels from the instances, cached semantic masks."""

    def __init__(self, root: str | Path, split: str = "train", *, cache_dir: str | Path | None = None,
                 prepare: int = -1, image_mode: str = "convert", max_pixels: int = images.DEFAULT_MAX_PIXELS,
                 skip_bad: bool = False, saliency_dir: str | None = None):
        """`prepare`: masks to paint now for the first N ids (-1 = all, 0 = none; the rest are painted on demand);
        `saliency_dir`: optional grayscale <id>.png saliency maps (absolute or relative to root)."""
        self.root = Path(root).expanduser()
        self.saliency_dir = None
        if saliency_dir:
            d = Path(saliency_dir).expanduser()
            self.saliency_dir = d if d.is_absolute() else self.root / d
            if not self.saliency_dir.is_dir():
                raise DataError(self.saliency_dir, "directory set by data.saliency_dir not found")
        if split not in SPLITS:
            raise DataError(None, f"COCO split {split!r} is not one of {', '.join(SPLITS)}")
        self.split = SPLITS[split]
        self.image_dir = self.root / self.split
        self.ann_file = self.root / "annotations" / f"instances_{self.split}.json"
        if not self.image_dir.is_dir():
            raise DataError(self.image_dir, "COCO image directory not found")
        if not self.ann_file.is_file():
            raise DataError(self.ann_file, "COCO annotation file not found")
        self.cache = Path(cache_dir).expanduser() / self.split if cache_dir else self.root / "wsss_cache" / self.split
        st = self.ann_file.stat()
        self.key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{POLICY}".encode()).hexdigest()[:12]
        self.mask_dir = self.cache / f"masks-{self.key}"
        index = self._load_or_build_index()
        self._files: dict[str, str] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._labels: dict[str, np.ndarray] = {}
        for sid, file_name, h, w, classes in index["images"]:
            self._files[sid], self._sizes[sid] = file_name, (h, w)
            vec = np.zeros(len(COCO_CLASSES) - 1, dtype=np.float32)
            vec[np.asarray(classes, dtype=np.int64) - 1] = 1.0
            self._labels[sid] = vec
        self.excluded_empty: int = index["excluded_empty"]
        super().__init__(list(self._files), COCO_CLASSES, image_mode=image_mode, max_pixels=max_pixels,
                         skip_bad=skip_bad, source=self.ann_file)
        self._annotations: Optional[dict[str, list[dict]]] = None  # loaded only to paint missing masks
        if prepare:
            self.build_masks(self.ids if prepare < 0 else self.ids[:prepare])

    @classmethod
    def from_config(cls, data_cfg: Any, split: str) -> "COCODataset":
        """Build from a `data` config section; masks are painted now for the ids the run will use."""
        return cls(data_cfg.root, split, cache_dir=data_cfg.cache_dir or None,
                   prepare=data_cfg.max_images if data_cfg.max_images > 0 else -1,
                   image_mode=data_cfg.image_mode, max_pixels=data_cfg.max_pixels, skip_bad=data_cfg.skip_bad,
                   saliency_dir=data_cfg.saliency_dir or None)

    # ---- index: ids, sizes, labels (small; avoids reading the 0.5 GB JSON on every run) --------
    def _load_or_build_index(self) -> dict:
        path = self.cache / f"index-{self.key}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("%s: unreadable cache index; rebuilding it", path)
        stale = sorted(self.cache.glob("index-*.json")) if self.cache.is_dir() else []
        if stale:
            log.warning("%s: annotation file or mask policy changed since the cached masks were made; "
                        "painting new ones (old masks-*/ and index-*.json there can be deleted)", self.cache)
        data = self._read_json()
        index = {"annotation_file": str(self.ann_file), "policy": POLICY, "images": [], "excluded_empty": 0}
        per_image = self._group(data)
        for img in sorted(data["images"], key=lambda im: im["id"]):
            anns = per_image.get(img["id"], [])
            if not anns:
                index["excluded_empty"] += 1
                continue
            classes = sorted({CAT_TO_CLASS[a["category_id"]] for a in anns})
            index["images"].append([img["sid"], img["file_name"], img["height"], img["width"], classes])
        if index["excluded_empty"]:
            log.info("%s: left out %d image(s) without annotations (as the usual WSSS COCO lists do)",
                     self.ann_file.name, index["excluded_empty"])
        self._write(lambda: atomic.write_json(path, index))
        return index

    def _read_json(self) -> dict:
        """The annotation JSON, validated: official categories, known ids, sizes, file names."""
        try:
            with open(self.ann_file, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(self.ann_file, f"not a readable JSON file ({e})") from None
        keys = ("images", "annotations", "categories")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
            raise DataError(self.ann_file, f"not a COCO instances file (needs lists {', '.join(keys)})")
        try:
            cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError):
            raise DataError(self.ann_file, "malformed 'categories' entry (needs id and name)") from None
        if sorted(cats) != COCO_CATEGORY_IDS:
            missing = sorted(set(COCO_CATEGORY_IDS) - set(cats))[:5]
            extra = sorted(set(cats) - set(COCO_CATEGORY_IDS))[:5]
            raise DataError(self.ann_file, f"categories are not the 80 official COCO ones (missing ids {missing}, "
                                           f"extra ids {extra})")
        seen: dict[str, Any] = {}
        for img in data["images"]:
            try:
                file_name, h, w = str(img["file_name"]), int(img["height"]), int(img["width"])
                img["id"]
            except (KeyError, TypeError, ValueError):
                raise DataError(self.ann_file, f"malformed image entry {str(img)[:200]}") from None
            if h <= 0 or w <= 0:
                raise DataError(self.ann_file, f"image {file_name}: size {w}x{h} is not positive")
            sid = check_sample_id(strip_image_extension(file_name), self.ann_file)
            if sid in seen:
                raise DataError(self.ann_file, f"duplicate id {sid!r} (image ids {seen[sid]} and {img['id']})")
            seen[sid] = img["id"]
            img["sid"], img["height"], img["width"] = sid, h, w
        return data

    def _group(self, data: dict) -> dict[Any, list[dict]]:
        by_image: dict[Any, list[dict]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or ann.get("image_id") not in by_image:
                raise DataError(self.ann_file, f"annotation {_ann_name(ann)} refers to an unknown image_id")
            if ann.get("category_id") not in CAT_TO_CLASS:
                raise DataError(self.ann_file, f"annotation {_ann_name(ann)} has unknown category_id "
                                               f"{ann.get('category_id')!r}")
            by_image[ann["image_id"]].append(ann)
        return by_image

    # ---- masks ----------------------------------------------------------------------------------
    def build_masks(self, ids: Iterable[str] | None = None, progress: bool = True) -> int:
        """Paint and cache the masks of `ids` (default: all) that are not cached yet; return how many."""
        ids = list(self.ids if ids is None else ids)
        todo = [sid for sid in ids if not self._cached(sid).is_file()]  # atomic writes: present = complete
        if not todo:
            return 0
        anns = self._load_annotations()
        it: Iterable[str] = todo
        if progress and len(todo) > 200:
            from tqdm import tqdm

            it = tqdm(todo, desc=f"painting COCO {self.split} masks (once)", leave=False, disable=None)
        bad: dict[str, str] = {}
        for sid in it:
            try:
                mask = paint_semantic_mask(anns[sid], self._sizes[sid], self.ann_file)
            except DataError as e:  # a malformed polygon or RLE spoils one image, not the split
                if not self.skip_bad:
                    raise
                bad[sid] = str(e)
                continue
            self._write(lambda: images.write_index_png(self._cached(sid), mask))
        if bad:
            self.skipped.update(bad)
            self.ids = [sid for sid in self.ids if sid not in bad]
            log.warning("skipped %d image(s) whose annotations cannot be painted (data.skip_bad=true); first: %s",
                        len(bad), next(iter(bad.values())))
        return len(todo) - len(bad)

    def _load_annotations(self) -> dict[str, list[dict]]:
        if self._annotations is None:
            data = self._read_json()
            per_image = self._group(data)
            self._annotations = {img["sid"]: per_image[img["id"]] for img in data["images"]
                                 if img["sid"] in self._files}
        return self._annotations

    def _cached(self, sample_id: str) -> Path:
        return self.mask_dir / f"{sample_id}.png"

    def _write(self, fn: Any) -> None:
        try:
            fn()
        except RunDirError as e:
            raise DataError(self.cache, f"cannot write the COCO mask cache ({e}); set data.cache_dir to a "
                                        "writable directory") from None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_annotations"] = None  # do not copy gigabytes of polygons into DataLoader workers
        return state

    # ---- per sample -----------------------------------------------------------------------------
    def image_path(self, sample_id: str) -> Path:
        return safe_join(self.image_dir, self._files[sample_id], self.ann_file)

    def mask_path(self, sample_id: str) -> Optional[Path]:
        path = self._cached(sample_id)
        if not path.is_file():
            log.debug("painting the missing COCO mask of %s", sample_id)
            self.build_masks([sample_id], progress=False)
        return path

    def saliency_path(self, sample_id: str) -> Optional[Path]:
        return None if self.saliency_dir is None else safe_join(self.saliency_dir, sample_id + ".png", self.ann_file)

    def _load_labels(self, sample_id: str) -> np.ndarray:
        return self._labels[sample_id]


def _ann_name(ann: Any) -> str:
    return str(ann.get("id", "?")) if isinstance(ann, dict) else repr(ann)[:80]


def decode_segmentation(ann: dict, hw: tuple[int, int], source: Path | str) -> np.ndarray:
    """One annotation's `segmentation` (polygons, RLE or compressed RLE) -> (H, W) uint8 0/1."""
    from pycocotools import mask as mask_utils

    h, w = hw
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):
            # pycocotools reads a 4-number list as a box; polygons need >= 3 points anyway
            polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            if len(polys) != len(seg):
                raise ValueError("polygons need an even number (>= 6) of coordinates")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w)) if polys else None
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if [int(v) for v in seg["size"]] != [h, w]:
                raise ValueError(f"RLE size {seg['size']} differs from the image size [{h}, {w}]")
            counts = seg["counts"]
            if isinstance(counts, list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise ValueError("segmentation is neither polygons nor RLE")
        if rle is None:
            return np.zeros((h, w), dtype=np.uint8)
        with warnings.catch_warnings():  # pycocotools predates numpy 2's __array__ copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode(rle)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise DataError(source, f"annotation {_ann_name(ann)}: bad segmentation ({e})") from None
    if m.shape != (h, w):
        raise DataError(source, f"annotation {_ann_name(ann)}: decoded to {m.shape}, expected {(h, w)}")
    return m


def paint_semantic_mask(anns: list[dict], hw: tuple[int, int], source: Path | str) -> np.ndarray:
    """Instances -> (H, W) uint8 class map: crowd regions 255 first, then instances largest first."""
    out = np.zeros(hw, dtype=np.uint8)
    crowd, things = [], []
    for ann in anns:
        m = decode_segmentation(ann, hw, source).astype(bool)
        (crowd if ann.get("iscrowd") else things).append((ann, m))
    for _, m in crowd:
        out[m] = images.IGNORE
    # larger first so smaller objects painted later stay visible; ties by annotation id for determinism
    things.sort(key=lambda t: (-int(t[1].sum()), str(t[0].get("id", ""))))
    for ann, m in things:
        out[m] = CAT_TO_CLASS[ann["category_id"]]
    return out

