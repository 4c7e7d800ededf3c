"""A data set whose saliency maps are read from another folder (e.g. a run's `saliency/` stage output)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from wsss.data.base import SegDataset
from wsss.io import images


class SaliencyFromDir(SegDataset):
    """Wraps a data set: `saliency_path(id)` is `directory/<id>.png`; everything else is the wrapped set's.

    `ids`, `skipped` and `skip_bad` belong to the wrapper (so `check` and `subset` work on it), as in
    SimulatedScribbles; the wrapped set's own saliency maps, if any, are no longer used.
    """

    def __init__(self, base: SegDataset, directory: str | Path, source: str = ""):
        if isinstance(base, SaliencyFromDir):  # re-pointing replaces the folder, it does not stack
            base = base.base
        self.base = base
        self.saliency_dir = Path(directory)
        self.saliency_source = source  # what made the maps (reports name it)
        self.ids = list(base.ids)
        self.skipped = dict(base.skipped)
        self.skip_bad = base.skip_bad

    def __repr__(self) -> str:
        return f"SaliencyFromDir({self.base!r}, {self.saliency_dir})"

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the wrapper lacks (class_names, max_pixels, adapter-specific ones)
        if name.startswith("__") or name == "base":  # no recursion while unpickling
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return self.base.class_names

    @property
    def allow_empty_labels(self) -> bool:  # type: ignore[override]
        return self.base.allow_empty_labels

    @property
    def has_masks(self) -> bool:
        return self.base.has_masks

    @property
    def has_scribbles(self) -> bool:
        return self.base.has_scribbles

    @property
    def has_saliency(self) -> bool:
        return bool(self.ids)

    def image_path(self, sample_id: str) -> Path:
        return self.base.image_path(sample_id)

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return self.base.mask_path(sample_id)

    def scribble_path(self, sample_id: str) -> Optional[Path]:
        return self.base.scribble_path(sample_id)

    def saliency_path(self, sample_id: str) -> Optional[Path]:
        return self.saliency_dir / f"{sample_id}.png"

    def _load_labels(self, sample_id: str) -> np.ndarray:
        return self.base._load_labels(sample_id)

    def load_image(self, sample_id: str) -> np.ndarray:
        return self.base.load_image(sample_id)

    def load_mask(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        return self.base.load_mask(sample_id, hw)

    def load_scribble(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        return self.base.load_scribble(sample_id, hw)

    def load_saliency(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        return images.read_saliency(self.saliency_path(sample_id), hw, self.max_pixels)

    def load_labels(self, sample_id: str) -> np.ndarray:
        return self.base.load_labels(sample_id)
