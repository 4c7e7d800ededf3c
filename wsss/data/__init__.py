"""Data sets (VOC 2012 + SBD, COCO 2014, a folder of your images, the synthetic `shapes` set), by name.

A data set is registered as a factory `(data_cfg, split) -> SegDataset` in `DATASETS`; a plug-in adds
its own with `@DATASETS.register("name")`.
"""

from __future__ import annotations

from typing import Any

from wsss.data.base import IGNORE, SegDataset, Sample, labels_from_mask
from wsss.registry import DATASETS

__all__ = ["IGNORE", "DATASETS", "SegDataset", "Sample", "labels_from_mask", "build_dataset"]


@DATASETS.register("shapes")
def shapes(data_cfg: Any, split: str) -> SegDataset:
    """The built-in synthetic set (generated once, cached)."""
    from wsss.data.shapes import ShapesDataset

    return ShapesDataset.from_config(data_cfg, split)


@DATASETS.register("voc12")
def voc12(data_cfg: Any, split: str) -> SegDataset:
    """PASCAL VOC 2012 (+ SBD's SegmentationClassAug)."""
    from wsss.data.voc import VOCDataset

    return VOCDataset.from_config(data_cfg, split)


@DATASETS.register("coco14")
def coco14(data_cfg: Any, split: str) -> SegDataset:
    """COCO 2014 (semantic masks from the instance annotations, cached once)."""
    from wsss.data.coco import COCODataset

    return COCODataset.from_config(data_cfg, split)


@DATASETS.register("folder")
def folder(data_cfg: Any, split: str) -> SegDataset:
    """A folder of your own images with a labels file and a class list."""
    from wsss.data.folder import FolderDataset

    return FolderDataset.from_config(data_cfg, split)


def build_dataset(data_cfg: Any, split: str) -> SegDataset:
    """The data set named by `data_cfg.dataset` for one split, with simulated scribbles and max_images applied."""
    ds = DATASETS.get(data_cfg.dataset)(data_cfg, split)
    if data_cfg.scribbles.source == "simulate":
        from wsss.data.scribble_sim import ScribbleSimulator

        sc = data_cfg.scribbles
        ds.simulate_scribbles(ScribbleSimulator(sc.fraction, sc.width, sc.seed))
    return ds.subset(data_cfg.max_images)
