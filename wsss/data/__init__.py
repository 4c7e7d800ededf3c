"""Data sets (VOC 2012 + SBD, COCO 2014, a folder of your images, the synthetic `shapes` set)."""

from __future__ import annotations

from typing import Any

from wsss.data.base import IGNORE, SegDataset, Sample, labels_from_mask

__all__ = ["IGNORE", "SegDataset", "Sample", "labels_from_mask", "build_dataset"]


def build_dataset(data_cfg: Any, split: str) -> SegDataset:
    """Build the data set named by `data_cfg.dataset` for one split, with the configured options."""
    name = data_cfg.dataset
    if name == "shapes":
        from wsss.data.shapes import ShapesDataset

        ds: SegDataset = ShapesDataset.from_config(data_cfg, split)
    elif name == "voc12":
        from wsss.data.voc import VOCDataset

        ds = VOCDataset.from_config(data_cfg, split)
    elif name == "coco14":
        from wsss.data.coco import COCODataset

        ds = COCODataset.from_config(data_cfg, split)
    elif name == "folder":
        from wsss.data.folder import FolderDataset

        ds = FolderDataset.from_config(data_cfg, split)
    else:  # the config validator lists the choices; this is a programming error
        raise ValueError(f"unknown data set {name!r}")
    if data_cfg.scribbles.source == "simulate":
        from wsss.data.scribbles import SimulatedScribbles

        ds = SimulatedScribbles.wrap(ds, data_cfg.scribbles)
    return ds.subset(data_cfg.max_images)
