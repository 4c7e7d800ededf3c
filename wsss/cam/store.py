"""Per-image CAM files: `cams/<id>.npz` with the present classes and float16 maps in [0, 1].

Keys: `classes` (K,) int16 label indices in the full class list (background 0 is never stored),
`cams` (K, H, W) float16 in [0, 1], normalised per class, `size` (2,) = (H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss.errors import DataError
from wsss.io import atomic


def write_cams(path: str | Path, classes: np.ndarray, cams: np.ndarray) -> None:
    """Atomically store (K,) class indices and (K, H, W) maps (cast to float16)."""
    cams = np.asarray(cams, dtype=np.float16)
    size = np.array(cams.shape[1:] if cams.ndim == 3 else (0, 0), dtype=np.int32)
    atomic.write_with(path, lambda f: np.savez_compressed(f, classes=np.asarray(classes, np.int16), cams=cams, size=size))


def read_cams(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load (classes (K,) int64, cams (K, H, W) float32) from a CAM file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            classes = z["classes"].astype(np.int64)
            cams = z["cams"].astype(np.float32)
            size = tuple(int(v) for v in z["size"])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(path, f"not a valid CAM file ({e}); rerun the cam stage") from None
    if cams.ndim != 3 or len(classes) != cams.shape[0]:
        raise DataError(path, f"CAM file has {len(classes)} classes but maps of shape {cams.shape}")
    if len(classes) == 0:
        cams = np.zeros((0, *size), np.float32)
    return classes, cams
