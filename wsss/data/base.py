"""One sample shape for every data set, and the base class the adapters share.

A sample is a dict:
    id        str
    image     (H, W, 3) uint8 RGB
    labels    (K,) float32 multi-hot over the K = C - 1 foreground classes (no background)
    mask      (H, W) uint8 in {0..C-1, 255}       (if the data set has masks)
    scribble  (H, W) uint8, class on scribble pixels, 255 elsewhere   (if available)
    saliency  (H, W) float32 in [0, 1]             (if available)
Class index 0 is background everywhere; `labels[k]` refers to class k + 1.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypedDict

import numpy as np


from wsss.errors import DataError
from wsss.io import images
from wsss.io.paths import check_sample_id

log = logging.getLogger(__name__)

IGNORE = images.IGNORE


class Sample(TypedDict, total=False):
    id: str
    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    scribble: np.ndarray
    saliency: np.ndarray


class SegDataset:
    """Base class: a list of ids, class names (background first) and per-id loaders.

    A plain map-style data set (len + getitem): torch DataLoaders accept it, and importing it
    does not import torch.

    Subclasses implement `image_path`, `_load_labels` and whichever of `mask_path`,
    `scribble_path`, `saliency_path` they support (returning None when absent).
    """

    class_names: list[str]
    scribble_simulator: Optional[Callable[[str, np.ndarray], np.ndarray]] = None  # (id, mask) -> scribbles
    saliency_folder: Optional[Path] = None  # saliency maps read from here instead (e.g. a run's saliency/)
    saliency_source: str = ""  # what made the maps in saliency_folder (reports name it)

    def __init__(self, ids: list[str], class_names: list[str], *, image_mode: str = "convert",
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, skip_bad: bool = False,
                 source: str | Path | None = None):
        self.class_names = list(class_names)
        self.image_mode = image_mode
        self.max_pixels = max_pixels
        self.skip_bad = skip_bad
        self.skipped: dict[str, str] = {}
        self.converted: Counter[str] = Counter()
        self.ids = _check_ids(ids, source)

    # ---- what subclasses provide -------------------------------------------------------------
    def image_path(self, sample_id: str) -> Path:
        raise NotImplementedError

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return None

    def scribble_path(self, sample_id: str) -> Optional[Path]:
        return None

    def saliency_path(self, sample_id: str) -> Optional[Path]:
        return None

    def _load_labels(self, sample_id: str) -> np.ndarray:
        """(K,) multi-hot; default: derived from the mask."""
        mask = self.load_mask(sample_id)
        if mask is None:
            raise DataError(None, f"{sample_id}: no image-level labels and no mask to derive them from")
        return labels_from_mask(mask, self.num_classes)

    # ---- shared API --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """C, including background."""
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        return bool(self.ids) and self.mask_path(self.ids[0]) is not None

    @property
    def has_scribbles(self) -> bool:
        return bool(self.ids) and (self.scribbles_simulated or self.scribble_path(self.ids[0]) is not None)

    @property
    def scribbles_simulated(self) -> bool:
        """Scribbles are drawn from the ground-truth masks (reports must say so)."""
        return self.scribble_simulator is not None

    def simulate_scribbles(self, simulator: Callable[[str, np.ndarray], np.ndarray]) -> "SegDataset":
        """Draw this set's scribbles from its masks with `simulator(id, mask)` instead of reading scribble files."""
        if self.ids and not self.has_masks:
            raise DataError(None, f"data.scribbles.source=simulate draws scribbles from ground-truth masks, but the "
                                  f"{type(self).__name__} data set has none; use a data set with masks or "
                                  "real scribbles (data.scribble_dir)")
        self.scribble_simulator = simulator
        return self

    @property
    def has_saliency(self) -> bool:
        return bool(self.ids) and self.saliency_file(self.ids[0]) is not None

    def saliency_file(self, sample_id: str) -> Optional[Path]:
        """Where this sample's saliency map is read from: `saliency_folder` when set, else the data set's own."""
        return self.saliency_folder / f"{sample_id}.png" if self.saliency_folder is not None else self.saliency_path(sample_id)

    def read_saliency_from(self, directory: str | Path, source: str = "") -> "SegDataset":
        """Read saliency maps from `directory/<id>.png` (e.g. the saliency stage's output) instead of the data set's."""
        self.saliency_folder, self.saliency_source = Path(directory), source
        return self

    def load_image(self, sample_id: str) -> np.ndarray:
        return images.read_image(self.image_path(sample_id), self.image_mode, self.max_pixels)

    def load_mask(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        p = self.mask_path(sample_id)
        return None if p is None else images.read_index_png(p, self.num_classes, hw, "mask", self.max_pixels)

    def load_scribble(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        if self.scribble_simulator is not None:
            return self.scribble_simulator(sample_id, self._simulation_mask(sample_id, hw))
        p = self.scribble_path(sample_id)
        return None if p is None else images.read_index_png(p, self.num_classes, hw, "scribble", self.max_pixels)

    def load_saliency(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        p = self.saliency_file(sample_id)
        return None if p is None else images.read_saliency(p, hw, self.max_pixels)

    def load_labels(self, sample_id: str) -> np.ndarray:
        labels = np.asarray(self._load_labels(sample_id), dtype=np.float32)
        if labels.shape != (self.num_classes - 1,):
            raise DataError(None, f"{sample_id}: label vector has shape {labels.shape}, expected ({self.num_classes - 1},)")
        return labels

    def load(self, sample_id: str, parts: Iterable[str] = ("image", "labels", "mask", "scribble", "saliency")) -> Sample:
        """Load the requested parts of one sample; sizes are checked against the image."""
        parts = set(parts)
        sample: Sample = {"id": sample_id}
        hw = None
        if "image" in parts:
            sample["image"] = self.load_image(sample_id)
            hw = sample["image"].shape[:2]
        elif parts & {"mask", "scribble", "saliency"}:
            hw = images.image_size(self.image_path(sample_id), self.max_pixels)
        if "mask" in parts and (m := self.load_mask(sample_id, hw)) is not None:
            sample["mask"] = m
        if "scribble" in parts and self.scribble_simulator is not None:  # from the mask, handed out only if asked
            mask = sample["mask"] if "mask" in sample else self._simulation_mask(sample_id, hw)
            sample["scribble"] = self.scribble_simulator(sample_id, mask)
        elif "scribble" in parts and (s := self.load_scribble(sample_id, hw)) is not None:
            sample["scribble"] = s
        if "saliency" in parts and (s := self.load_saliency(sample_id, hw)) is not None:
            sample["saliency"] = s
        if "labels" in parts:
            sample["labels"] = self.load_labels(sample_id)
        return sample

    def _simulation_mask(self, sample_id: str, hw: tuple[int, int] | None) -> np.ndarray:
        mask = self.load_mask(sample_id, hw)
        if mask is None:
            raise DataError(self.mask_path(sample_id), f"{sample_id}: no ground-truth mask to simulate scribbles from")
        return mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.ids[index])

    def check(self, parts: Iterable[str] = ("image", "labels", "mask"), progress: bool = False) -> "SegDataset":
        """Read every sample once. Bad ones raise, or with skip_bad are dropped with a warning and a count."""
        good = []
        converted_before = images.CONVERSIONS.counts.copy()
        it: Iterable[str] = self.ids
        if progress:
            from tqdm import tqdm

            it = tqdm(self.ids, desc="checking data", leave=False, disable=None)  # no bar in logs
        for sid in it:
            try:
                s = self.load(sid, parts)
                if "labels" in parts and not s["labels"].any() and not self.allow_empty_labels:
                    raise DataError(self.image_path(sid), "empty label set (no foreground class); image-level "
                                                          "methods cannot learn from it")
                good.append(sid)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.skipped[sid] = str(e)
        # image_mode=convert: say once how many grayscale/RGBA/CMYK images were converted to RGB
        self.converted = images.CONVERSIONS.counts - converted_before
        if self.converted:
            log.warning("converted %s to RGB (data.image_mode=convert; use strict to reject them)",
                        ", ".join(f"{n} {kind} image(s)" for kind, n in self.converted.items()))
        if self.skipped:
            first = next(iter(self.skipped.values()))
            log.warning("skipped %d bad sample(s) of %d (data.skip_bad=true); first: %s", len(self.skipped), len(self.ids), first)
        self.ids = good
        return self

    allow_empty_labels: bool = False

    def subset(self, n: int) -> "SegDataset":
        """Keep only the first n ids (n <= 0 keeps all)."""
        if n > 0:
            self.ids = self.ids[:n]
        return self

    def select(self, ids: Iterable[str]) -> "SegDataset":
        """A copy of this data set that has only `ids` (in that order; each must be one of its ids)."""
        ids = list(ids)
        unknown = set(ids) - set(self.ids)
        if unknown:
            raise DataError(None, f"{len(unknown)} id(s) not in this data set, e.g. {sorted(unknown)[0]!r}")
        part = copy.copy(self)  # shares the loaders' settings (saliency folder, scribble simulator)
        part.ids = _check_ids(ids, None)
        return part


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) mask -> (C-1,) multi-hot of the foreground classes present (255 ignored)."""
    if mask.dtype == np.uint8:  # bincount is ~50x faster than np.unique on uint8 maps
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        present = np.unique(mask)
    labels = np.zeros(num_classes - 1, dtype=np.float32)
    for c in present:
        if 0 < c < num_classes:
            labels[c - 1] = 1.0
    return labels


def read_id_list(path: str | Path, whole_line: bool = False) -> list[str]:
    """Read a split list: one id per line; extra columns ignored, as in SBD-style lists.

    whole_line=True keeps the whole (stripped) line as the id, for ids that contain spaces.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "split list not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(path, "split list is not UTF-8 text") from None
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line if whole_line else line.split()[0]
        # SBD/IRN style lists sometimes hold "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
        if first.startswith(("/JPEGImages/", "JPEGImages/")):
            # keep everything after the directory (not just the stem) so "../" in it is still rejected
            first = first.split("JPEGImages/", 1)[1]
            first = first[: -len(Path(first).suffix)] if Path(first).suffix.lower() in (".jpg", ".jpeg", ".png") else first
        ids.append(check_sample_id(first, f"{path}:{n}"))
    if not ids:
        raise DataError(path, "split list is empty")
    return ids


def _check_ids(ids: list[str], source: Any) -> list[str]:
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in seen:
            raise DataError(source, f"duplicate id {sid!r} (entries {seen[sid] + 1} and {i + 1})")
        seen[sid] = i
    return list(ids)
