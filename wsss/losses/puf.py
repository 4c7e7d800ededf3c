"""Pretended Under-Fitting (PMM, ICCV 2021), as WSSS_MMSeg's cross_entropy implements it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsss.io.images import IGNORE


@dataclass
class PUFOptions:
    """`seg.loss.puf`: PMM's loss switch (clamp | pow | ignore), the mean-loss threshold beta and k."""

    type: str = "clamp"
    beta: float = 0.5
    k: float = 0.5


def pretended_under_fitting(logits: torch.Tensor, target: torch.Tensor, kind: str = "clamp",
                            beta: float = 0.5, k: float = 0.5) -> torch.Tensor:
    """PUF loss. logits (N, C, H, W), target (N, H, W), 255 = ignore -> scalar.

    Pixel CE with ignored pixels at 0; once its mean over *all* N*H*W pixels drops below beta the
    model is "fitting" and the per-pixel losses are transformed so the largest (presumed noisy)
    pixels stop pulling: clamp -> min(l, k) (clamped pixels get zero gradient), pow -> (l + 1e-9)^k,
    ignore -> l * [l <= k]. The result is averaged over all pixels, like mmseg 0.x.
    """
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    if loss.mean() < beta:
        if kind == "clamp":
            loss = torch.clamp(loss, 0, k)
        elif kind == "pow":
            loss = (loss + 1e-9) ** k
        elif kind == "ignore":
            loss = loss * (loss <= k).to(loss.dtype)
        else:
            raise ValueError(f"unknown PUF type {kind!r}")
    return loss.mean()
