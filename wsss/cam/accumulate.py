"""Localization maps accumulated during CAM training: a running pixel-wise maximum per image and class.

One file per image, `<dir>/<id>.npz` (keys `classes` (K,) int16 label indices, background 0 never
stored, and `maps` (K, h, w) float16 in [0, 1] on the training grid), written atomically: a kill leaves
the previous version, and a resumed run keeps taking the maximum with it. Online Attention
Accumulation and Group-WSSS store their maps this way; the stage `accumulated_cams` turns them into
ordinary `cams/<id>.npz` at image size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss.errors import DataError
from wsss.io import atomic

__all__ = ["AccumulatedMaps"]


class AccumulatedMaps:
    """Per-image running maxima of class maps in a directory (read, update, list)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def path(self, sample_id: str) -> Path:
        return self.dir / f"{sample_id}.npz"

    def read(self, sample_id: str) -> dict[int, np.ndarray]:
        """{label index: (h, w) float32 map} of one image ({} if it has none yet)."""
        path = self.path(sample_id)
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                classes, maps = z["classes"].astype(np.int64), z["maps"].astype(np.float32)
        except (OSError, KeyError, ValueError) as e:
            raise DataError(path, f"not a valid accumulated-map file ({e}); delete it to start its maps afresh") from None
        return {int(c): m for c, m in zip(classes, maps)}

    def write(self, sample_id: str, maps: dict[int, np.ndarray]) -> None:
        """Replace one image's maps (atomic)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        classes = np.array(sorted(maps), dtype=np.int16)
        stack = np.stack([maps[int(c)] for c in classes]).astype(np.float16) if len(classes) else np.zeros((0, 1, 1), np.float16)
        atomic.write_with(self.path(sample_id), lambda f: np.savez_compressed(f, classes=classes, maps=stack))

    def update(self, sample_id: str, new: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Pixel-wise maximum of the stored maps with `new` ({label index: (h, w) in [0, 1]}); returns the result."""
        maps = self.read(sample_id)
        for c, m in new.items():
            m = np.asarray(m, dtype=np.float32)
            old = maps.get(c)
            maps[c] = m if old is None or old.shape != m.shape else np.maximum(old, m)
        if new:
            self.write(sample_id, maps)
        return maps

    def ids(self) -> list[str]:
        """Ids with a finished file (half-written temporaries are skipped)."""
        return sorted(p.stem for p in atomic.finished_files(self.dir, "*.npz")) if self.dir.is_dir() else []
