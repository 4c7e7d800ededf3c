"""Normalized-cut loss (Tang et al., CVPR 2018, arXiv 1804.01346) on our permutohedral lattice.

    L_NC = (1/N) sum_n sum_k  S_{n,k}^T W_n (1 - S_{n,k}) / (d_n^T S_{n,k}),   d_n = W_n 1_ROI,   S = softmax x ROI,

W the bilateral kernel exp(-|p_i - p_j|^2 / 2 sigma_xy^2 - |I_i - I_j|^2 / 2 sigma_rgb^2) on the pixels of
the ROI (self term included), RGB in 0..255. Per class: cut(A_k, rest) / assoc(A_k, all), the soft
normalized cut of the paper's eq. (4)-(5); each term is in [0, 1] and the loss is unchanged when W is
multiplied by a constant, so the lattice's ~0.5x normalisation (wsss/losses/densecrf_loss.py) needs no
correction. With sum_k S_k = 1 the numerator is d^T S_k - S_k^T W S_k.

Gradient through S only (W depends on the image): dL/dS_k = (-2 W S_k / (d^T S_k) + (S_k^T W S_k) d /
(d^T S_k)^2) / N, masked by the ROI, with W S and d from the forward pass (one lattice pass over C + 1
channels per step; W treated as symmetric, which the lattice is up to rounding). Downscaling as in
rloss's DenseCRF loss (`scale`: softmax bilinear, image and ROI nearest, sigma_xy x scale).
`kernel="exact"` uses the dense O(N^2) Gaussian (tests, calibration; float64-safe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from wsss.crf.filters import BilateralFilter
from wsss.losses.densecrf_loss import KERNELS, dense_bilateral_filter, downscale
from wsss.registry import REGULARIZERS


@dataclass
class NCutOptions:
    """`seg.loss.ncut.*`: normalized-cut loss; weight in our units (docs/methods/scribbles.md, "Regularized-loss family")."""

    weight: float = 3.0  # voc12 recipes (512 crops): same mean |dL/dlogits| as the DenseCRF loss at 2.4e-8 (docs/methods/scribbles.md)
    sigma_rgb: float = 15.0  # rloss's DenseCRF bandwidths, reused for the dense kernel
    sigma_xy: float = 100.0  # full-resolution pixels; multiplied by `scale`
    scale: float = 0.5  # computed on a downscaled output, as rloss's DenseCRF loss
    eps: float = 1e-8  # floor of d^T S_k (a class with no mass contributes 0, not 0/0)
    # all: the paper's sum over every class; present: only background and the image's own classes (its
    # tags, which its scribbles imply). With all 21 VOC classes the sum is a 21-way balanced cut that
    # spreads each image over absent classes (docs/methods/scribbles.md, "normalized cut on voc12-mini")
    classes: str = "all"


class _NCutFunction(torch.autograd.Function):
    """sum over images and classes of 1 - S^T W S / d^T S, / N; analytic gradient from one filter pass."""

    @staticmethod
    def forward(ctx, s: Tensor, roi: Tensor, filt: Callable[[Tensor], Tensor], eps: float,  # type: ignore[override]
                keep: Tensor) -> Tensor:
        both = filt(torch.cat([s.detach(), roi], 1))  # (B, C + 1, H, W): W S and d = W 1_ROI in one pass
        ws, d = both[:, :-1], both[:, -1:]
        assoc = (s * ws).sum((2, 3))  # (B, C) S_k^T W S_k
        vol = (s * d).sum((2, 3))  # (B, C) d^T S_k
        den = vol.clamp_min(eps)
        ctx.save_for_backward(ws, d, assoc, den, keep)
        ctx.n = s.shape[0]
        return ((vol - assoc) / den * keep).sum() / s.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        ws, d, assoc, den, keep = ctx.saved_tensors
        g = (-2.0 * ws / den[..., None, None] + (assoc / den.square())[..., None, None] * d) * keep[..., None, None]
        return grad * g / ctx.n, None, None, None, None


def ncut_loss(probs: Tensor, image: Tensor, roi: Optional[Tensor], sigma_rgb: float, sigma_xy: float,
              scale: float = 1.0, kernel: str = "lattice", eps: float = 1e-8, classes: Optional[Tensor] = None) -> Tensor:
    """Unweighted normalized-cut loss: probs (B, C, H, W) softmax, image (B, 3, H, W) 0..255, roi (B, H, W) bool -> scalar.

    sigma_xy is in full-resolution pixels (multiplied by `scale`). classes (B, C) bool: the class terms
    that count (None = all). Each image contributes at most C.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if roi is None:
        roi = torch.ones(probs.shape[0], *probs.shape[2:], dtype=torch.bool, device=probs.device)
    probs, image, roi = downscale(probs, image.to(probs.dtype), roi, scale)
    m = roi[:, None].to(probs.dtype)
    s = probs * m  # outside the ROI: no mass, no degree, no gradient
    img = image.detach()
    if kernel == "exact":
        def filt(v: Tensor) -> Tensor:
            return dense_bilateral_filter(img, v, sigma_xy * scale, sigma_rgb)
    else:
        filt = BilateralFilter(img, sigma_xy * scale, sigma_rgb, normalization="none")
    keep = torch.ones(probs.shape[:2], dtype=probs.dtype, device=probs.device) if classes is None else classes.to(probs.dtype)
    return _NCutFunction.apply(s, m, filt, eps, keep)


def image_classes(labels: Tensor) -> Tensor:
    """Image-level tags (B, C - 1) multi-hot -> (B, C) bool: background and the tagged classes."""
    return torch.cat([torch.ones_like(labels[:, :1], dtype=torch.bool), labels > 0.5], 1)


class NCutLoss(nn.Module):
    """weight x normalized-cut loss of softmax probabilities (B, C, H, W) given image (B, 3, H, W) 0..255 and roi (B, H, W)."""

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale: float = 0.5, kernel: str = "lattice",
                 eps: float = 1e-8, classes: str = "all"):
        super().__init__()
        if classes not in CLASS_CHOICES:
            raise ValueError(f"classes must be one of {CLASS_CHOICES}, got {classes!r}")
        self.weight, self.sigma_rgb, self.sigma_xy, self.scale, self.kernel, self.eps = weight, sigma_rgb, sigma_xy, scale, kernel, eps
        self.classes = classes
        self.needs_labels = classes == "present"  # ProbabilityRegularizer then passes the image tags

    def forward(self, probs: Tensor, image: Tensor, roi: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
        """labels (B, C - 1): image tags, read when classes="present" -> weighted scalar loss."""
        if self.needs_labels and labels is None:
            raise ValueError("normalized cut with classes='present' needs the image tags (labels)")
        keep = image_classes(labels) if self.needs_labels else None
        return self.weight * ncut_loss(probs, image, roi, self.sigma_rgb, self.sigma_xy, self.scale, self.kernel, self.eps, keep)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, scale={self.scale}, "
                f"kernel={self.kernel}, classes={self.classes}")


CLASS_CHOICES = ("all", "present")


def build_ncut(opts: NCutOptions) -> NCutLoss:
    """The loss module of `seg.loss.ncut` options."""
    return NCutLoss(opts.weight, opts.sigma_rgb, opts.sigma_xy, opts.scale, eps=opts.eps, classes=opts.classes)


__all__ = ["NCutLoss", "NCutOptions", "build_ncut", "image_classes", "ncut_loss"]


@REGULARIZERS.register("ncut", options=NCutOptions)
def ncut(options: NCutOptions, context: Any = None) -> nn.Module:
    """The normalized-cut loss (Tang et al., CVPR 2018) as a regulariser (`seg.loss.regularizer: ncut`)."""
    from wsss.losses.regularized import ProbabilityRegularizer

    return ProbabilityRegularizer(build_ncut(options), ("ncut_loss",))
