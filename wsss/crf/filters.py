"""Gaussian (xy) and bilateral (xy + rgb) filters on image batches, differentiable w.r.t. the values.

Layouts: image ``(B, 3, H, W)`` float with colours in 0..255 (a de-normalised training batch);
values ``(B, C, H, W)``. The features follow densecrf: ``(x / sigma_xy, y / sigma_xy)`` and
``(x / sigma_xy, y / sigma_xy, r / sigma_rgb, g / sigma_rgb, b / sigma_rgb)``, x the column.

Normalisation (``normalization=``): ``"none"`` (default) is the raw lattice output, numerically the
permutohedral filter of rloss / CRF-as-RNN / densecrf (alpha = 1/(1+2^-d) included, about 0.5x the
exact Gaussian sum including the self term); ``"symmetric"`` is D^-1/2 K D^-1/2 (densecrf's default
for CRF kernels); ``"row"`` is K v / K 1 (a weighted average).
"""

from __future__ import annotations

from collections import OrderedDict
import torch
from torch import Tensor

from wsss.crf.lattice import PermutohedralLattice

# Spatial lattices depend only on (H, W, sigma, device): keep a few, images of one size share them.
_SPATIAL_CACHE: "OrderedDict[tuple, PermutohedralLattice]" = OrderedDict()
_SPATIAL_CACHE_SIZE = 4


def spatial_features(height: int, width: int, sigma_xy: float, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """(x / sigma_xy, y / sigma_xy) per pixel in row-major order -> (H*W, 2)."""
    x = torch.arange(width, device=device, dtype=dtype) / sigma_xy
    y = torch.arange(height, device=device, dtype=dtype) / sigma_xy
    return torch.stack([x.expand(height, width), y[:, None].expand(height, width)], -1).reshape(-1, 2)


def bilateral_features(image: Tensor, sigma_xy: float, sigma_rgb: float) -> tuple[Tensor, Tensor]:
    """image (B, 3, H, W) in 0..255 -> features (B*H*W, 5) and batch index (B*H*W,)."""
    b, c, h, w = image.shape
    if c != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    xy = spatial_features(h, w, sigma_xy, image.device, dtype)  # (HW, 2)
    rgb = image.to(dtype).permute(0, 2, 3, 1).reshape(b, h * w, 3) / sigma_rgb
    feats = torch.cat([xy.expand(b, h * w, 2), rgb], 2).reshape(b * h * w, 5)
    batch = torch.arange(b, device=image.device).repeat_interleave(h * w)
    return feats, batch


def spatial_lattice(height: int, width: int, sigma_xy: float,
                    device: torch.device | str = "cpu") -> PermutohedralLattice:
    """The (cached) lattice of the xy features of an H x W grid."""
    key = (int(height), int(width), float(sigma_xy), str(torch.device(device)))
    lat = _SPATIAL_CACHE.get(key)
    if lat is None:
        lat = PermutohedralLattice(spatial_features(height, width, sigma_xy, device))
        _SPATIAL_CACHE[key] = lat
        while len(_SPATIAL_CACHE) > _SPATIAL_CACHE_SIZE:
            _SPATIAL_CACHE.popitem(last=False)
    else:
        _SPATIAL_CACHE.move_to_end(key)
    return lat


def _to_rows(values: Tensor) -> Tensor:
    """(B, C, H, W) -> (B*H*W, C)."""
    b, c, h, w = values.shape
    return values.permute(0, 2, 3, 1).reshape(b * h * w, c)


def _from_rows(rows: Tensor, shape: torch.Size) -> Tensor:
    """(B*H*W, C) -> (B, C, H, W)."""
    b, c, h, w = shape
    return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)


class GaussianFilter:
    """Spatial Gaussian filter for H x W maps, built once; call on values (B, C, H, W)."""

    def __init__(self, height: int, width: int, sigma_xy: float, normalization: str = "none",
                 device: torch.device | str = "cpu") -> None:
        self.shape = (int(height), int(width))
        self.normalization = normalization
        self.lattice = spatial_lattice(height, width, sigma_xy, device)

    def __call__(self, values: Tensor) -> Tensor:
        """values (B, C, H, W) -> (B, C, H, W); one lattice pass for the whole batch."""
        b, c, h, w = values.shape
        if (h, w) != self.shape:
            raise ValueError(f"values are {h}x{w}, the filter was built for {self.shape[0]}x{self.shape[1]}")
        # Every image shares the grid, so the batch is folded into the channels: (HW, B*C).
        rows = values.reshape(b * c, h * w).t()
        out = self.lattice.filter(rows, self.normalization)
        return out.t().reshape(b, c, h, w)


class BilateralFilter:
    """Bilateral (xy + rgb) filter built once from image (B, 3, H, W) in 0..255; call on values (B, C, H, W)."""

    def __init__(self, image: Tensor, sigma_xy: float, sigma_rgb: float, normalization: str = "none") -> None:
        feats, batch = bilateral_features(image.detach(), sigma_xy, sigma_rgb)
        self.shape = (image.shape[0], image.shape[2], image.shape[3])
        self.normalization = normalization
        self.lattice = PermutohedralLattice(feats, batch if image.shape[0] > 1 else None)

    def __call__(self, values: Tensor) -> Tensor:
        """values (B, C, H, W) -> (B, C, H, W), differentiable w.r.t. values."""
        if (values.shape[0], values.shape[2], values.shape[3]) != self.shape:
            raise ValueError(f"values {tuple(values.shape)} do not match the image {self.shape}")
        return _from_rows(self.lattice.filter(_to_rows(values), self.normalization), values.shape)


def gaussian_filter(values: Tensor, sigma_xy: float, normalization: str = "none") -> Tensor:
    """Spatial Gaussian filter of values (B, C, H, W) -> (B, C, H, W), with autograd."""
    return GaussianFilter(values.shape[2], values.shape[3], sigma_xy, normalization, values.device)(values)


def bilateral_filter(image: Tensor, values: Tensor, sigma_xy: float, sigma_rgb: float,
                     normalization: str = "none") -> Tensor:
    """Bilateral filter of values (B, C, H, W) guided by image (B, 3, H, W) in 0..255, with autograd."""
    return BilateralFilter(image, sigma_xy, sigma_rgb, normalization)(values)


def clear_cache() -> None:
    """Drop the cached spatial lattices."""
    _SPATIAL_CACHE.clear()


__all__ = [
    "BilateralFilter",
    "GaussianFilter",
    "bilateral_features",
    "bilateral_filter",
    "clear_cache",
    "gaussian_filter",
    "spatial_features",
    "spatial_lattice",
]
