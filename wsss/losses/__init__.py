"""Segmentation losses, picked by name from `seg.loss.name` (see build_seg_loss)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from wsss.losses.ce import cross_entropy, partial_cross_entropy
from wsss.losses.puf import pretended_under_fitting

# A segmentation loss maps (logits (N, C, H, W), batch dict, model) to (loss, {name: value}).
SegLoss = Callable[[torch.Tensor, dict, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def build_pixel_loss(name: str, loss_cfg: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-head supervised term: (logits (N, C, H, W), target (N, H, W)) -> scalar."""
    if name in ("ce",):
        return cross_entropy
    if name == "puf":
        p = loss_cfg.puf
        return lambda logits, target: pretended_under_fitting(logits, target, p.type, p.beta, p.k)
    if name in ("pce", "pce_densecrf", "dfr"):
        return partial_cross_entropy
    raise ValueError(f"unknown loss {name!r}")
