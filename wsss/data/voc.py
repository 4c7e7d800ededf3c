"""PASCAL VOC 2012 (+ SBD `SegmentationClassAug`) in the VOCdevkit layout.

    VOCdevkit/VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png          palette PNGs (1,464 train + 1,449 val)
      SegmentationClassAug/<id>.png       SBD-augmented index PNGs (10,582 train_aug), optional
      Annotations/<id>.xml                optional, source of image-level labels
      ImageSets/Segmentation/<split>.txt  (train_aug.txt also found in ImageSets/SegmentationAug/)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from wsss.data.base import SegDataset, read_id_list
from wsss.data.classes import VOC_CLASSES
from wsss.data.labels import labels_from_voc_xml, read_cls_labels_npy
from wsss.errors import DataError
from wsss.io import images
from wsss.io.paths import safe_join

log = logging.getLogger(__name__)

LABEL_SOURCES = ("auto", "cls_labels", "xml", "mask")
SPLIT_DIRS = ("ImageSets/Segmentation", "ImageSets/SegmentationAug", "ImageSets/SegmentationClassAug")


def find_voc_root(root: str | Path) -> Path:
    """Accept `.../VOCdevkit/VOC2012`, `.../VOCdevkit` or their parent; return the VOC2012 directory."""
    root = Path(root).expanduser()
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(root, "no JPEGImages directory here, in VOC2012/ or in VOCdevkit/VOC2012/; "
                          "data.root should point at .../VOCdevkit/VOC2012")


def find_split_list(voc_root: Path, split: str) -> Path:
    """A split name (`train`, `train_aug`, ...) or a path to a list file -> the list file."""
    if split.endswith(".txt") or "/" in split:
        for cand in (Path(split).expanduser(), voc_root / split):
            if cand.is_file():
                return cand
        raise DataError(split, "split list not found")
    cands = [voc_root / d / f"{split}.txt" for d in SPLIT_DIRS]
    for cand in cands:
        if cand.is_file():
            return cand
    raise DataError(cands[0], f"split list for split {split!r} not found (also looked in "
                              f"{', '.join(str(c.parent.relative_to(voc_root)) for c in cands[1:])})")


def resolve_data_file(value: str, *roots: Path) -> Path:
    """A configured file: as given if it exists (absolute or relative to the cwd), else under each root."""
    p = Path(value).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    for r in roots:
        if (r / p).is_file():
            return r / p
    return p


def resolve_data_dir(value: str, root: Path) -> Path:
    """A configured directory: absolute, or relative to the data set root."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


class VOCDataset(SegDataset):
    """PASCAL VOC 2012 segmentation split; labels from cls_labels.npy, XML annotations or masks."""

    def __init__(self, root: str | Path, split: str = "train", *, mask_dir: str | None = None,
                 cls_labels: str | Path | None = None, label_source: str = "auto",
                 scribble_dir: str | None = None, saliency_dir: str | None = None,
                 image_mode: str = "convert", max_pixels: int = images.DEFAULT_MAX_PIXELS,
                 skip_bad: bool = False):
        self.given_root = Path(root)
        self.root = find_voc_root(root)
        self.split = split
        self.list_path = find_split_list(self.root, split)
        super().__init__(read_id_list(self.list_path), VOC_CLASSES, image_mode=image_mode,
                         max_pixels=max_pixels, skip_bad=skip_bad, source=self.list_path)
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self._pick_mask_dir(mask_dir)
        self.scribble_dir = self._optional_dir(scribble_dir, "data.scribble_dir")
        self.saliency_dir = self._optional_dir(saliency_dir, "data.saliency_dir")
        self.label_source = self._pick_label_source(label_source, cls_labels)
        self._labels: dict[str, np.ndarray] = {}
        if self.label_source == "cls_labels":
            self._load_npy(resolve_data_file(str(cls_labels), self.given_root, self.root))

    @classmethod
    def from_config(cls, data_cfg: Any, split: str) -> "VOCDataset":
        """Build from a `data` config section (wsss.config.DataConfig)."""
        return cls(data_cfg.root, split, mask_dir=data_cfg.mask_dir or None, cls_labels=data_cfg.cls_labels or None,
                   label_source=data_cfg.get("label_source", "auto") or "auto",
                   scribble_dir=data_cfg.scribble_dir or None, saliency_dir=data_cfg.saliency_dir or None,
                   image_mode=data_cfg.image_mode, max_pixels=data_cfg.max_pixels, skip_bad=data_cfg.skip_bad)

    # ---- layout ---------------------------------------------------------------------------------
    def _pick_mask_dir(self, mask_dir: str | None) -> Optional[Path]:
        if mask_dir:
            d = resolve_data_dir(mask_dir, self.root)
            if not d.is_dir():
                raise DataError(d, "mask directory (data.mask_dir) not found")
            return d
        aug, plain = self.root / "SegmentationClassAug", self.root / "SegmentationClass"
        if self.split.endswith("_aug") or self.list_path.parent.name == "SegmentationAug":
            if aug.is_dir():
                return aug
            # SegmentationClass covers only 1,464 of the 10,582 train_aug images: do not pretend.
            log.info("%s: no SegmentationClassAug directory, so split %s has no masks", self.root, self.split)
            return None
        return plain if plain.is_dir() else None

    def _optional_dir(self, value: str | None, key: str) -> Optional[Path]:
        if not value:
            return None
        d = resolve_data_dir(value, self.root)
        if not d.is_dir():
            raise DataError(d, f"directory set by {key} not found")
        return d

    def _pick_label_source(self, source: str, cls_labels: str | Path | None) -> str:
        if source not in LABEL_SOURCES:
            raise DataError(None, f"label source {source!r} is not one of {', '.join(LABEL_SOURCES)}")
        if source == "auto":
            # cls_labels if given; else XML like IRN's make_cls_labels.py; else the masks
            if cls_labels:
                source = "cls_labels"
            elif (self.root / "Annotations").is_dir():
                source = "xml"
            else:
                source = "mask"
        if source == "cls_labels" and not cls_labels:
            raise DataError(None, "label source cls_labels needs data.cls_labels=<path to cls_labels.npy>")
        if source == "xml" and not (self.root / "Annotations").is_dir():
            raise DataError(self.root / "Annotations", "annotation directory not found")
        if source == "mask" and self.mask_dir is None:
            raise DataError(self.root, f"no image-level labels for split {self.split!r}: no data.cls_labels, "
                                       "no Annotations/ and no masks to derive them from")
        return source

    def _load_npy(self, path: Path) -> None:
        table = read_cls_labels_npy(path, self.num_classes - 1)
        missing = [sid for sid in self.ids if sid not in table]
        if missing:
            problem = (f"no labels for {len(missing)} of the {len(self.ids)} ids of {self.list_path.name} "
                       f"(e.g. {', '.join(missing[:3])})")
            if not self.skip_bad:
                raise DataError(path, problem)
            for sid in missing:
                self.skipped[sid] = f"{path}: no labels for {sid}"
            log.warning("%s: %s; skipped them (data.skip_bad=true)", path, problem)
            self.ids = [sid for sid in self.ids if sid in table]
        self._labels = {sid: table[sid] for sid in self.ids}

    # ---- per sample -----------------------------------------------------------------------------
    def image_path(self, sample_id: str) -> Path:
        return safe_join(self.image_dir, sample_id + ".jpg", self.list_path)

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return None if self.mask_dir is None else safe_join(self.mask_dir, sample_id + ".png", self.list_path)

    def scribble_path(self, sample_id: str) -> Optional[Path]:
        return None if self.scribble_dir is None else safe_join(self.scribble_dir, sample_id + ".png", self.list_path)

    def saliency_path(self, sample_id: str) -> Optional[Path]:
        if self.saliency_dir is None:
            return None
        png = safe_join(self.saliency_dir, sample_id + ".png", self.list_path)
        jpg = safe_join(self.saliency_dir, sample_id + ".jpg", self.list_path)
        return jpg if not png.is_file() and jpg.is_file() else png

    def xml_path(self, sample_id: str) -> Path:
        return safe_join(self.root / "Annotations", sample_id + ".xml", self.list_path)

    def _load_labels(self, sample_id: str) -> np.ndarray:
        if self.label_source == "cls_labels":
            return self._labels[sample_id]
        if self.label_source == "xml":
            if sample_id not in self._labels:  # parsed lazily: 10k small files cost seconds up front
                self._labels[sample_id] = labels_from_voc_xml(self.xml_path(sample_id), self.class_names)
            return self._labels[sample_id]
        return super()._load_labels(sample_id)
