"""DenseCRF loss (Tang et al., ECCV 2018), computed as rloss does, on our permutohedral lattice.

    L = -(1/N) sum_n sum_k S_{n,k}^T W_n S_{n,k},   S = softmax output x ROI,

W the bilateral kernel exp(-|p_i - p_j|^2 / 2 sigma_xy^2 - |I_i - I_j|^2 / 2 sigma_rgb^2) (self term
included), RGB in 0..255. As in rloss's PyTorch code: image and ROI are downscaled by `scale` with
nearest sampling, the softmax bilinearly, sigma_xy is multiplied by `scale`, and the gradient is
-2 W S / N masked by the ROI (one filter pass per step: W S of the forward pass is reused).

`W S` uses `wsss.crf.filters.BilateralFilter(normalization="none")`: the raw lattice, numerically the
one of rloss / densecrf (about 0.5x the exact Gaussian sum). `kernel="exact"` uses the dense O(N^2)
kernel instead (tests, calibration). docs/methods/scribbles.md derives the loss weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.crf.filters import BilateralFilter, bilateral_features

KERNELS = ("lattice", "exact")


@dataclass
class DenseCRFLossOptions:
    """`seg.loss.densecrf`: the DenseCRF loss as rloss computes it; weight in our units (docs/methods/scribbles.md)."""

    weight: float = 2.4e-8  # = rloss's 2e-9 x its batch size 12 (our pCE is not divided by the batch size)
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0  # full-resolution pixels; multiplied by `scale` like rloss
    scale: float = 0.5  # compute on a downscaled output (rloss --rloss-scale)


def dense_bilateral_filter(image: Tensor, values: Tensor, sigma_xy: float, sigma_rgb: float,
                           chunk: int = 2048) -> Tensor:
    """Exact sum_j W_ij v_j per image (self term included): image (B, 3, H, W), values (B, C, H, W) -> same.

    O((HW)^2) time, O(chunk x HW) memory: for tests and calibration, not for training. Differentiable.
    """
    b, c, h, w = values.shape
    out = []
    for i in range(b):
        f, _ = bilateral_features(image[i:i + 1].to(values.dtype), sigma_xy, sigma_rgb)  # (HW, 5)
        v = values[i].reshape(c, h * w).t()  # (HW, C)
        sq = (f * f).sum(1)
        rows = []
        for s in range(0, h * w, chunk):
            fs = f[s:s + chunk]
            # |a-b|^2 through the Gram matrix, clamped: rounding can make it slightly negative.
            d2 = (sq[s:s + chunk, None] + sq[None, :] - 2.0 * fs @ f.t()).clamp_min(0.0)
            rows.append(torch.exp(-0.5 * d2) @ v)
        out.append(torch.cat(rows).t().reshape(c, h, w))
    return torch.stack(out)


class _LatticeQuadratic(torch.autograd.Function):
    """-(1/N) sum S * (W S) with rloss's gradient -2 (W S) / N (W treated as symmetric; one filter pass)."""

    @staticmethod
    def forward(ctx, s: Tensor, filt: BilateralFilter) -> Tensor:  # type: ignore[override]
        ws = filt(s.detach())
        ctx.save_for_backward(ws)
        ctx.n = s.shape[0]
        return -(s * ws).sum() / s.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (ws,) = ctx.saved_tensors
        return -2.0 * grad * ws / ctx.n, None


def downscale(probs: Tensor, image: Tensor, roi: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """rloss's downscaling: probs bilinear, image and ROI nearest; (B,C,H,W), (B,3,H,W), (B,H,W) -> scaled."""
    if scale == 1.0:
        return probs, image, roi
    probs = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
    image = F.interpolate(image, scale_factor=scale, mode="nearest")
    roi = F.interpolate(roi[:, None].to(image.dtype), scale_factor=scale, mode="nearest")[:, 0] > 0.5
    return probs, image, roi


def densecrf_loss(probs: Tensor, image: Tensor, roi: Optional[Tensor], sigma_rgb: float, sigma_xy: float,
                  scale: float = 1.0, kernel: str = "lattice") -> Tensor:
    """Unweighted DenseCRF loss: probs (B, C, H, W) softmax, image (B, 3, H, W) 0..255, roi (B, H, W) bool -> scalar.

    sigma_xy is in full-resolution pixels (it is multiplied by `scale`, as rloss does).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if roi is None:
        roi = torch.ones(probs.shape[0], *probs.shape[2:], dtype=torch.bool, device=probs.device)
    probs, image, roi = downscale(probs, image.to(probs.dtype), roi, scale)
    s = probs * roi[:, None].to(probs.dtype)  # ROI-masked segments: padding carries no mass
    if kernel == "exact":
        return -(s * dense_bilateral_filter(image, s, sigma_xy * scale, sigma_rgb)).sum() / s.shape[0]
    filt = BilateralFilter(image.detach(), sigma_xy * scale, sigma_rgb, normalization="none")
    return _LatticeQuadratic.apply(s, filt)


class DenseCRFLoss(nn.Module):
    """weight x DenseCRF loss of softmax probabilities (B, C, H, W) given image (B, 3, H, W) 0..255 and roi (B, H, W)."""

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale: float = 0.5, kernel: str = "lattice"):
        super().__init__()
        self.weight, self.sigma_rgb, self.sigma_xy, self.scale, self.kernel = weight, sigma_rgb, sigma_xy, scale, kernel

    def forward(self, probs: Tensor, image: Tensor, roi: Optional[Tensor] = None) -> Tensor:
        """-> weighted scalar loss."""
        return self.weight * densecrf_loss(probs, image, roi, self.sigma_rgb, self.sigma_xy, self.scale, self.kernel)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, scale={self.scale}, kernel={self.kernel}"
