"""Complementary patch pairs (CPN, ICCV 2021): masks that hide part of a crop in one view and the rest in its twin.

A mask m (H, W) is 1 where view 1 keeps the pixel; view 2 keeps the complement (1 - m), so the two
views add up to the crop. As the official `tool/imutils.py` does it:
  superpixels (`hide_patch_ss`, the default): SLIC (n_segments 300, compactness 10) of the crop, then
      floor(0.5 * (max_id + 1)) ids drawn *with replacement* from 0..max_id; pixels with a drawn id are
      hidden in view 1. Ids start at 1 and repeats are wasted, so about 39% of the superpixels are hidden
      on average, not half. `kept` = fraction of pixels view 1 keeps.
  grid (`hide_patch`): one cell size drawn from `grid_sizes` (px), each cell hidden with probability
      0.5; `kept` = fraction of *cells* view 1 keeps (the code counts cells, not pixels).
`ComplementaryPairSet` adds a mask to every training sample; the loss applies it to the normalised
images (hidden pixels become 0 after normalisation, as in the official code).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ComplementaryPairSet", "grid_mask", "superpixel_mask"]


def superpixel_mask(image: np.ndarray, rng: np.random.Generator, n_segments: int = 300, compactness: float = 10.0,
                    hide_fraction: float = 0.5, replacement: bool = True) -> tuple[np.ndarray, float]:
    """(H, W, 3) image in [0, 1] -> (mask (H, W) bool, True = kept in view 1; fraction of pixels kept).

    replacement=True is the official draw: floor(hide_fraction * (max_id + 1)) ids from 0..max_id with
    repeats. replacement=False hides exactly round(hide_fraction * segments) distinct superpixels.
    """
    from skimage.segmentation import slic

    spx = slic(image, n_segments=n_segments, compactness=compactness, start_label=1, channel_axis=-1)
    top = int(spx.max())
    if replacement:
        drawn = rng.integers(0, top + 1, size=int(math.floor((top + 1) * hide_fraction)))
    else:
        drawn = rng.choice(np.arange(1, top + 1), size=int(round(top * hide_fraction)), replace=False)
    keep = ~np.isin(spx, drawn)
    return keep, float(keep.mean())


def grid_mask(height: int, width: int, rng: np.random.Generator, grid_sizes: Sequence[int] = (224, 448),
              hide_prob: float = 0.5) -> tuple[np.ndarray, float]:
    """Grid strategy: (mask (H, W) bool, True = kept in view 1; fraction of grid *cells* kept, as the code counts)."""
    size = int(grid_sizes[int(rng.integers(len(grid_sizes)))])
    keep = np.ones((height, width), bool)
    kept = cells = 0
    for y in range(0, height, size):
        for x in range(0, width, size):
            cells += 1
            if rng.random() <= hide_prob:
                keep[y : y + size, x : x + size] = False
            else:
                kept += 1
    return keep, kept / cells


class ComplementaryPairSet(Dataset):
    """Wraps a classification set: each sample also gets `cp_mask` (S, S) bool (view 1 keeps) and `cp_kept` ()."""

    def __init__(self, base: Dataset, options: Any):
        """options: strategy ("superpixel" | "grid"), n_segments, compactness, hide_fraction, replacement,
        grid_sizes, hide_prob (the fields of CPNOptions)."""
        self.base, self.o = base, options

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = dict(self.base[i])
        image = s["image"]  # (3, S, S) float 0..255
        # torch's generator is seeded per worker by the loader (and by seed_everything): reproducible draws
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        if self.o.strategy == "grid":
            keep, kept = grid_mask(image.shape[1], image.shape[2], rng, self.o.grid_sizes, self.o.hide_prob)
        else:
            rgb = (image.permute(1, 2, 0).numpy() / 255.0).clip(0.0, 1.0)
            keep, kept = superpixel_mask(rgb, rng, self.o.n_segments, self.o.compactness, self.o.hide_fraction,
                                         self.o.replacement)
        s["cp_mask"] = torch.from_numpy(keep)
        s["cp_kept"] = torch.tensor(kept, dtype=torch.float32)
        return s
