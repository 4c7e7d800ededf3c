"""Grid-CRF (nearest-neighbour Potts) loss, the sparse counterpart of the DenseCRF loss (Tang et al., ECCV 2018).

    L_grid = (1/N) sum_n sum_k S_{n,k}^T W_n (1 - S_{n,k}),    S = softmax x ROI,
    W_pq   = exp(-|I_p - I_q|^2 / 2 sigma_rgb^2) / |p - q|   for q one of the 4 or 8 neighbours of p, else 0,

the Potts model with contrast-sensitive weights (Boykov & Jolly 2001; GrabCut) in the bilinear
relaxation the paper uses for every CRF loss (`relaxation="bilinear"`); `"squared"` is
sum_pairs w_pq |S_p - S_q|^2, another relaxation of the same Potts energy. W is symmetric (each
neighbour pair enters in both directions, as in S^T W (1 - S)), so on a hard labelling both equal
2 x sum_{unordered pairs} w_pq [l_p != l_q]. Pairs with a pixel outside the ROI are dropped.

`sigma_rgb=None` (default) estimates the contrast per image as GrabCut does, 2 sigma^2 = the mean of
|I_p - I_q|^2 over the image's neighbour pairs in the ROI. Vectorised with shifted slices (one per
neighbour direction; no lattice); the gradient is plain autograd, through S only. RGB in 0..255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from wsss.losses.densecrf_loss import downscale

RELAXATIONS = ("bilinear", "squared")
# One direction per unordered neighbour pair: right, down (4); + down-right, down-left (8).
OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}


@dataclass
class PottsOptions:
    """`seg.loss.potts.*`: grid-CRF (nearest-neighbour Potts) loss; weight in our units (docs/methods/scribbles.md)."""

    weight: float = 1.2e-6  # voc12 recipes (512 crops): same mean |dL/dlogits| as the DenseCRF loss at 2.4e-8 (docs/methods/scribbles.md)
    neighbours: int = 8  # 4 | 8
    sigma_rgb: Optional[float] = None  # None: GrabCut's per-image estimate 2 sigma^2 = mean |I_p - I_q|^2
    relaxation: str = "bilinear"  # bilinear (the paper's S^T W (1 - S)) | squared (w |S_p - S_q|^2)
    scale: float = 1.0  # 1 = full resolution; < 1 downscales like the DenseCRF loss (neighbours get farther apart)


def _pair(x: Tensor, dy: int, dx: int) -> tuple[Tensor, Tensor]:
    """Slices of x (..., H, W) at p and at q = p + (dy, dx), over every p whose q is inside -> two (..., H-|dy|, W-|dx|)."""
    h, w = x.shape[-2:]
    a = x[..., : h - dy, max(0, -dx): w - max(0, dx)]
    b = x[..., dy:, max(0, dx): w - max(0, -dx)]
    return a, b


def grid_weights(image: Tensor, roi: Tensor, neighbours: int = 8, sigma_rgb: Optional[float] = None) -> list[Tensor]:
    """Contrast-sensitive Potts weights per direction of OFFSETS[neighbours]: image (B, 3, H, W), roi (B, H, W) -> [(B, H', W')].

    Zero where either pixel is outside the ROI.
    """
    if neighbours not in OFFSETS:
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours}")
    img = image.detach()
    diffs, masks = [], []
    for dy, dx in OFFSETS[neighbours]:
        ia, ib = _pair(img, dy, dx)
        ra, rb = _pair(roi, dy, dx)
        diffs.append((ia - ib).square().sum(1))  # (B, H', W') |I_p - I_q|^2
        masks.append((ra & rb).to(img.dtype))
    if sigma_rgb is None:
        # GrabCut's beta = 1 / (2 <|I_p - I_q|^2>) per image, over the pairs inside the ROI.
        tot = sum((d * m).sum((1, 2)) for d, m in zip(diffs, masks))
        cnt = sum(m.sum((1, 2)) for m in masks)
        two_sigma2 = (tot / cnt.clamp_min(1.0)).clamp_min(1e-6)[:, None, None]  # (B, 1, 1); flat image -> tiny
    else:
        two_sigma2 = torch.as_tensor(2.0 * sigma_rgb ** 2, dtype=img.dtype, device=img.device)
    return [torch.exp(-d / two_sigma2) * m / math.hypot(dy, dx)
            for d, m, (dy, dx) in zip(diffs, masks, OFFSETS[neighbours])]


def potts_loss(probs: Tensor, image: Tensor, roi: Optional[Tensor], neighbours: int = 8, sigma_rgb: Optional[float] = None,
               relaxation: str = "bilinear", scale: float = 1.0) -> Tensor:
    """Unweighted grid-CRF loss: probs (B, C, H, W) softmax, image (B, 3, H, W) 0..255, roi (B, H, W) bool -> scalar."""
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
    if roi is None:
        roi = torch.ones(probs.shape[0], *probs.shape[2:], dtype=torch.bool, device=probs.device)
    probs, image, roi = downscale(probs, image.to(probs.dtype), roi, scale)
    s = probs * roi[:, None].to(probs.dtype)
    total = probs.new_zeros(())
    for w, (dy, dx) in zip(grid_weights(image, roi, neighbours, sigma_rgb), OFFSETS[neighbours]):
        sa, sb = _pair(s, dy, dx)
        if relaxation == "bilinear":  # both directions: S_p^T (1 - S_q) + S_q^T (1 - S_p)
            pair = (sa * (1 - sb)).sum(1) + (sb * (1 - sa)).sum(1)
        else:
            pair = (sa - sb).square().sum(1)
        total = total + (w * pair).sum()
    return total / probs.shape[0]


class PottsLoss(nn.Module):
    """weight x grid-CRF loss of softmax probabilities (B, C, H, W) given image (B, 3, H, W) 0..255 and roi (B, H, W)."""

    def __init__(self, weight: float, neighbours: int = 8, sigma_rgb: Optional[float] = None, relaxation: str = "bilinear",
                 scale: float = 1.0):
        super().__init__()
        if neighbours not in OFFSETS:
            raise ValueError(f"neighbours must be 4 or 8, got {neighbours}")
        if relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
        self.weight, self.neighbours, self.sigma_rgb, self.relaxation, self.scale = weight, neighbours, sigma_rgb, relaxation, scale

    def forward(self, probs: Tensor, image: Tensor, roi: Optional[Tensor] = None) -> Tensor:
        """-> weighted scalar loss."""
        return self.weight * potts_loss(probs, image, roi, self.neighbours, self.sigma_rgb, self.relaxation, self.scale)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, neighbours={self.neighbours}, sigma_rgb={self.sigma_rgb}, "
                f"relaxation={self.relaxation}, scale={self.scale}")


def build_potts(opts: PottsOptions) -> PottsLoss:
    """The loss module of `seg.loss.potts` options."""
    return PottsLoss(opts.weight, opts.neighbours, opts.sigma_rgb, opts.relaxation, opts.scale)


class PottsRegularizer(nn.Module):
    """pCE + grid-CRF loss (`seg.loss.regularizer: potts`): reg(out, batch, step) -> (loss, parts)."""

    needs_features = False

    def __init__(self, options: Optional[PottsOptions] = None):
        super().__init__()
        self.potts = build_potts(options or PottsOptions())

    def forward(self, out: dict[str, Tensor], batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.potts(out["logits"].softmax(1), batch["image"], batch.get("roi"))
        return loss, {"potts_loss": loss.detach()}


__all__ = ["PottsLoss", "PottsOptions", "PottsRegularizer", "build_potts", "grid_weights", "potts_loss"]
