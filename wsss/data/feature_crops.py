"""Training samples read from a frozen encoder's feature cache (wsss/engine/feature_cache.py).

A sample is the image path of `SegmentationSet` moved into feature space: one of the cached views
(a scale from a fixed list, mirrored or not) replaces the random rescale and flip, and the random
crop is taken on every cached level at the same place, its origin a multiple of the coarsest
level's stride so that a crop of S pixels is exactly S / stride cells on each level. The image-space
parts (target, roi and the RGB the regularised losses read) are rescaled, flipped and cropped to the
same window. What lies beyond the view is padding as the image path pads: RGB 0, target 255, roi
False, and on each level the encoder's features of a black image's interior (stored once per cache),
which is what the image path's black padding becomes away from the image's border.

Cache files: `<cache>/<id>/<view>_L<level>.npy`, float16 (C, h, w), memory-mapped when read, and
`<cache>/padding_L<level>.npy`, float16 (C,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from wsss.data.base import IGNORE
from wsss.data.transforms import SegmentationSet, to_tensor_image
from wsss.errors import DataError


@dataclass(frozen=True)
class CacheLayout:
    """What a feature cache holds: which encoder levels (and their strides), for which views."""

    num_levels: int  # length of the encoder's output list
    levels: tuple[int, ...]  # the indices the decoder and heads read (only these are stored)
    strides: tuple[int, ...]  # stride of each stored level, in input pixels
    scales: tuple[float, ...]  # view scales
    flips: tuple[bool, ...]  # (False,) or (False, True)

    @property
    def alignment(self) -> int:
        """Crop origins are multiples of this (the coarsest stored stride)."""
        return max(self.strides)

    def views(self) -> list[tuple[float, bool]]:
        """Every (scale, flipped) view, in a fixed order."""
        return [(s, f) for s in self.scales for f in self.flips]


def view_name(scale: float, flipped: bool) -> str:
    """File-name stem of a view, e.g. "s0.75_flip"."""
    return f"s{scale:g}_{'flip' if flipped else 'orig'}"


def level_file(image_dir: Path, scale: float, flipped: bool, level: int) -> Path:
    """Where one level of one view of an image is stored."""
    return image_dir / f"{view_name(scale, flipped)}_L{level}.npy"


def padding_file(cache_dir: Path, level: int) -> Path:
    """Where one level's padding vector (the features inside a black image, (C,) float16) is stored."""
    return cache_dir / f"padding_L{level}.npy"


def scaled_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) of an image rescaled by `scale` (at least one pixel)."""
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def view_image(image: np.ndarray, scale: float, flipped: bool, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """An (H, W[, 3]) array rescaled (bilinear for images, nearest for labels) and mirrored as one view."""
    h, w = scaled_size(image.shape[:2], scale)
    out = image if (h, w) == image.shape[:2] else cv2.resize(image, (w, h), interpolation=interpolation)
    return np.ascontiguousarray(out[:, ::-1]) if flipped else out


def crop_padded(array: np.ndarray, top: int, left: int, size: int, fill: float | np.ndarray) -> np.ndarray:
    """A size x size window of the last two axes of `array` at (top, left), padded with `fill` beyond it
    (a scalar, or one value per channel: shape (C,) for a (C, h, w) array)."""
    fill = np.asarray(fill, dtype=array.dtype)
    out = np.empty((*array.shape[:-2], size, size), dtype=array.dtype)
    out[...] = fill.reshape(fill.shape + (1, 1)) if fill.ndim else fill
    h = max(0, min(size, array.shape[-2] - top))
    w = max(0, min(size, array.shape[-1] - left))
    out[..., :h, :w] = array[..., top : top + h, left : left + w]
    return out


class ViewSampler:
    """Draws (view index, crop origin fractions) per sample; reseeded per loader worker like albumentations."""

    def __init__(self, num_views: int, seed: int):
        self.num_views = num_views
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        """Restart the stream (called by `wsss.data.transforms.seed_worker` in each worker)."""
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[int, float, float]:
        """(view index, fraction along y, fraction along x), each fraction in [0, 1)."""
        return int(self.rng.integers(self.num_views)), float(self.rng.random()), float(self.rng.random())


def crop_origin(size: int, crop: int, alignment: int, fraction: float) -> int:
    """Origin of a crop of `crop` pixels in a side of `size`, a multiple of `alignment`, chosen by `fraction`."""
    positions = max(0, size - crop) // alignment + 1
    return min(int(fraction * positions), positions - 1) * alignment


class CachedFeatureSet(Dataset):
    """`SegmentationSet` samples with the encoder's features read from the cache (see the module doc).

    Returns features (a list over encoder levels: (C, S/stride, S/stride) float16 for stored levels,
    an empty tensor for the others), image (3, S, S) 0..255, target (S, S) int64, roi (S, S) bool,
    labels (K,) and index, like `SegmentationSet`.
    """

    def __init__(self, targets: SegmentationSet, cache_dir: Path, layout: CacheLayout, crop_size: int, seed: int):
        if crop_size % layout.alignment:
            raise ValueError(f"crop size {crop_size} is not a multiple of the coarsest cached stride {layout.alignment}")
        self.targets, self.cache_dir, self.layout, self.crop_size = targets, Path(cache_dir), layout, crop_size
        self.views = layout.views()
        self.augment = ViewSampler(len(self.views), seed)
        self.padding = {level: self._read(padding_file(self.cache_dir, level)) for level in layout.levels}

    def __len__(self) -> int:
        return len(self.targets)

    def read_level(self, sample_id: str, scale: float, flipped: bool, level: int) -> np.ndarray:
        """One stored level of one view, memory-mapped, (C, h, w) float16."""
        return self._read(level_file(self.cache_dir / sample_id, scale, flipped, level))

    def _read(self, path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(path, f"feature cache file unreadable ({e}); delete {self.cache_dir} to rebuild it") from None

    def __getitem__(self, i: int) -> dict[str, Any]:
        base = self.targets.base
        sid = base.ids[i]
        s = base.load(sid, ("image", "labels"))
        target = self.targets.target(sid, s["image"].shape[:2])
        view, fy, fx = self.augment()
        scale, flipped = self.views[view]
        image = view_image(s["image"], scale, flipped)
        target = view_image(target, scale, flipped, cv2.INTER_NEAREST)
        size, align = self.crop_size, self.layout.alignment
        top, left = crop_origin(image.shape[0], size, align, fy), crop_origin(image.shape[1], size, align, fx)
        features: list[torch.Tensor] = [torch.empty(0, dtype=torch.float16)] * self.layout.num_levels
        for level, stride in zip(self.layout.levels, self.layout.strides):
            cells = self.read_level(sid, scale, flipped, level)
            features[level] = torch.from_numpy(crop_padded(cells, top // stride, left // stride, size // stride,
                                                            self.padding[level]))
        image = crop_padded(image.transpose(2, 0, 1), top, left, size, 0).transpose(1, 2, 0)
        roi = crop_padded(np.ones(target.shape, np.uint8), top, left, size, 0)
        target = crop_padded(target, top, left, size, IGNORE)
        return {
            "features": features,
            "image": to_tensor_image(image),
            "target": torch.from_numpy(target).long(),
            "roi": torch.from_numpy(roi == 1),
            "labels": torch.from_numpy(s["labels"]),
            "index": i,
        }


def default_scales(scale_range: tuple[float, float], count: int = 3) -> tuple[float, ...]:
    """`count` view scales evenly spaced over the training scale range, rounded to 1/100."""
    lo, hi = scale_range
    if math.isclose(lo, hi) or count == 1:
        return (round(hi, 2),)
    return tuple(round(lo + (hi - lo) * k / (count - 1), 2) for k in range(count))
