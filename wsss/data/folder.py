"""A folder of the user's own images with image-level labels (see docs/datasets.md).

    root/
      images/<id>.jpg|.png|...   ids may contain subfolders: images/farm/cow_01.jpg -> farm/cow_01
      labels.csv | labels.json   image-level labels (class names or indices), or data.cls_labels
      classes.txt                class names, background first (optional if labels use names only)
      masks/<id>.png             optional index/palette PNGs (0 = background, 255 = ignore)
      scribbles/<id>.png         optional, 255 = unlabelled
      saliency/<id>.png          optional grayscale
      splits/<split>.txt         optional; without splits/ every split is all labelled images

Check a folder before training with `wsss data check configs/folder_example.yaml data.root=ROOT`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from wsss.data.base import SegDataset, read_id_list
from wsss.data.classes import check_class_names, read_class_list
from wsss.data.labels import IMAGE_EXTENSIONS, LabelTable, read_cls_labels_npy, read_label_table, strip_image_extension
from wsss.data.voc import resolve_data_dir, resolve_data_file
from wsss.errors import DataError
from wsss.io import images
from wsss.io.paths import check_sample_id, safe_join

log = logging.getLogger(__name__)


def index_files(directory: Path, suffixes: tuple[str, ...], source: Path) -> dict[str, Path]:
    """id -> file for every file under `directory` with one of `suffixes` (case-insensitive).

    Each file is re-joined through safe_join, so a symlink that leaves `directory` is an error.
    """
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                continue
            rel = (Path(dirpath) / name).relative_to(directory).as_posix()
            path = safe_join(directory, rel, source)
            sid = check_sample_id(rel[: -len(Path(name).suffix)], path)
            if sid in found:
                raise DataError(path, f"two files for id {sid!r} ({found[sid].name} and {name}); keep one")
            found[sid] = path
    return found


class FolderDataset(SegDataset):
    """Images in `root/images`, labels from a CSV/JSON file, optional masks, scribbles and saliency."""

    def __init__(self, root: str | Path, split: str = "train", *, labels_file: str | Path | None = None,
                 classes_file: str | Path | None = None, mask_dir: str | None = None,
                 scribble_dir: str | None = None, saliency_dir: str | None = None,
                 image_mode: str = "convert", max_pixels: int = images.DEFAULT_MAX_PIXELS, skip_bad: bool = False):
        self.root = Path(root).expanduser()
        self.split = split
        self.image_dir = self.root / "images"
        if not self.image_dir.is_dir():
            raise DataError(self.image_dir, "image directory not found; put your images in <root>/images/")
        self.labels_file = self._find_labels_file(labels_file)
        self.classes_file = self._find_classes_file(classes_file)
        self.mask_dir = self._optional_dir(mask_dir, "masks", "data.mask_dir")
        self.scribble_dir = self._optional_dir(scribble_dir, "scribbles", "data.scribble_dir")
        self.saliency_dir = self._optional_dir(saliency_dir, "saliency", "data.saliency_dir")

        image_files = index_files(self.image_dir, IMAGE_EXTENSIONS, self.image_dir)
        if not image_files:
            raise DataError(self.image_dir, f"no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        class_names, listed, encoded, problems = self._read_labels()

        split_file = self._split_file()
        if split_file is not None:
            ids = read_id_list(split_file, whole_line=True)  # photo names may contain spaces
            ids = [strip_image_extension(i) for i in ids]
            source: Path = split_file
        else:
            ids = listed  # labels-file order
            source = self.labels_file
        in_split = set(ids)
        problems = {sid: e for sid, e in problems.items() if sid in in_split}  # other splits' rows do not matter
        # split entries and labels must match the images; with skip_bad mismatches are dropped and counted
        for sid in ids:
            if sid not in image_files:
                problems.setdefault(sid, DataError(source, f"id {sid!r} has no image in {self.image_dir}"))
            elif sid not in encoded and sid not in problems:
                problems[sid] = DataError(self.labels_file, f"image {image_files[sid].name} ({sid!r}) has no row")
        if split_file is None:
            unlabelled = [sid for sid in image_files if sid not in encoded and sid not in problems]
            for sid in unlabelled:
                problems[sid] = DataError(self.labels_file, f"image {image_files[sid].relative_to(self.root)} "
                                                            f"has no row (every image needs labels, maybe empty)")
        super().__init__(ids, class_names, image_mode=image_mode, max_pixels=max_pixels, skip_bad=skip_bad,
                         source=source)
        self._images = image_files
        self._labels = encoded
        self._report(problems)
        self.ids = [sid for sid in self.ids if sid not in problems]
        if not self.ids:
            raise DataError(source, f"split {split!r} has no usable images")
        self._masks = self._index_optional(self.mask_dir, (".png",), "masks")
        self._scribbles = self._index_optional(self.scribble_dir, (".png",), "scribbles")
        self._saliency = self._index_optional(self.saliency_dir, (".png", ".jpg", ".jpeg"), "saliency maps")

    @classmethod
    def from_config(cls, data_cfg: Any, split: str) -> "FolderDataset":
        """Build from a `data` config section (wsss.config.DataConfig)."""
        return cls(data_cfg.root, split, labels_file=data_cfg.cls_labels or None,
                   classes_file=data_cfg.classes_file or None, mask_dir=data_cfg.mask_dir or None,
                   scribble_dir=data_cfg.scribble_dir or None, saliency_dir=data_cfg.saliency_dir or None,
                   image_mode=data_cfg.image_mode, max_pixels=data_cfg.max_pixels, skip_bad=data_cfg.skip_bad)

    # ---- layout ---------------------------------------------------------------------------------
    def _find_labels_file(self, given: str | Path | None) -> Path:
        if given:
            p = resolve_data_file(str(given), self.root)
            if not p.is_file():
                raise DataError(p, "labels file (data.cls_labels) not found")
            return p
        found = [self.root / n for n in ("labels.csv", "labels.json") if (self.root / n).is_file()]
        if len(found) > 1:
            raise DataError(self.root, "both labels.csv and labels.json exist; remove one or set data.cls_labels")
        if not found:
            raise DataError(self.root / "labels.csv", "labels file not found (labels.csv or labels.json, "
                                                      "or set data.cls_labels)")
        return found[0]

    def _find_classes_file(self, given: str | Path | None) -> Optional[Path]:
        if given:
            p = resolve_data_file(str(given), self.root)
            if not p.is_file():
                raise DataError(p, "class list (data.classes_file) not found")
            return p
        p = self.root / "classes.txt"
        return p if p.is_file() else None

    def _optional_dir(self, value: str | None, default: str, key: str) -> Optional[Path]:
        if value:
            d = resolve_data_dir(value, self.root)
            if not d.is_dir():
                raise DataError(d, f"directory set by {key} not found")
            return d
        d = self.root / default
        return d if d.is_dir() else None

    def _split_file(self) -> Optional[Path]:
        splits = self.root / "splits"
        if not splits.is_dir():
            log.info("%s: no splits/ directory, so split %r is every labelled image", self.root, self.split)
            return None
        check_sample_id(self.split, "the split name")
        p = safe_join(splits, f"{self.split}.txt")
        if not p.is_file():
            have = sorted(q.stem for q in splits.glob("*.txt"))
            raise DataError(p, f"split list not found (splits/ has: {', '.join(have) or 'nothing'})")
        return p

    def _read_labels(self) -> tuple[list[str], list[str], dict[str, np.ndarray], dict[str, DataError]]:
        """Class names, ids in file order, {id: multi-hot} and {id: problem} for rows that cannot be encoded."""
        if self.labels_file.suffix.lower() == ".npy":  # a cls_labels.npy with string ids (ToCo format)
            if self.classes_file is None:
                raise DataError(self.labels_file, "a .npy labels file holds indices only; add classes.txt")
            names = read_class_list(self.classes_file)
            table = read_cls_labels_npy(self.labels_file, len(names) - 1)
            for sid in table:
                check_sample_id(sid, self.labels_file)
            return names, list(table), table, {}
        table = read_label_table(self.labels_file)
        names = self._class_names(table)
        encoded: dict[str, np.ndarray] = {}
        problems: dict[str, DataError] = {}
        for sid in table.tokens:
            try:
                encoded[sid] = table.encode(sid, names)
            except DataError as e:
                problems[sid] = e
        return names, list(table.tokens), encoded, problems

    def _class_names(self, table: LabelTable) -> list[str]:
        if self.classes_file is not None:
            return read_class_list(self.classes_file)
        if self.mask_dir is not None or self.scribble_dir is not None:
            # a mask's pixel values mean nothing without a fixed class order
            raise DataError(self.root / "classes.txt", "class list not found; it is required when masks or "
                                                       "scribbles are present (one name per line, background first)")
        names = sorted(table.names(), key=str.lower)
        numeric = [n for n in names if n.lstrip("-").isdigit()]
        if numeric or not names:
            raise DataError(self.labels_file, "labels use class indices (or none at all) but there is no "
                                              "classes.txt to say what they mean")
        names = check_class_names(["background", *names], self.labels_file)
        log.info("%s: no classes.txt; using the %d class names of %s in alphabetical order: %s",
                 self.root, len(names) - 1, self.labels_file.name, ", ".join(names[1:]))
        return names

    def _report(self, problems: dict[str, DataError]) -> None:
        if not problems:
            return
        first = next(iter(problems.values()))
        if not self.skip_bad:
            more = f" (and {len(problems) - 1} more problem(s) like it)" if len(problems) > 1 else ""
            raise DataError(first.path, first.problem + more)
        for sid, e in problems.items():
            self.skipped[sid] = str(e)
        log.warning("skipped %d bad sample(s) of split %s (data.skip_bad=true); first: %s",
                    len(problems), self.split, first)

    def _index_optional(self, directory: Optional[Path], suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
        if directory is None:
            return {}
        found = index_files(directory, suffixes, directory)
        covered = sum(sid in found for sid in self.ids)
        if 0 < covered < len(self.ids):
            log.info("%s: %d of %d images of split %s have %s; used where present", directory, covered,
                     len(self.ids), self.split, what)
        return found

    # ---- per sample -----------------------------------------------------------------------------
    def image_path(self, sample_id: str) -> Path:
        return self._images[sample_id]

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return self._masks.get(sample_id)

    def scribble_path(self, sample_id: str) -> Optional[Path]:
        return self._scribbles.get(sample_id)

    def saliency_path(self, sample_id: str) -> Optional[Path]:
        return self._saliency.get(sample_id)

    @property
    def has_masks(self) -> bool:
        """True when every image of this split has a mask (partially masked splits train without them)."""
        return bool(self.ids) and all(sid in self._masks for sid in self.ids)

    @property
    def has_scribbles(self) -> bool:
        return bool(self.ids) and all(sid in self._scribbles for sid in self.ids)

    @property
    def has_saliency(self) -> bool:
        return bool(self.ids) and all(sid in self._saliency for sid in self.ids)

    def _load_labels(self, sample_id: str) -> np.ndarray:
        return self._labels[sample_id]

