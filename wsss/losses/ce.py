"""Cross-entropy variants with ignore label 255."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from wsss.io.images import IGNORE



def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over labelled pixels. logits (N, C, H, W), target (N, H, W) with 255 = ignore."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0  # keeps the graph (DDP needs every parameter used) with zero loss
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pCE for scribbles: CE averaged over the labelled (scribble) pixels only; same form as cross_entropy.

    rloss additionally divides by the batch size (`batch_average`); we do not, and calibrate the
    regulariser weight instead (docs/methods/scribbles.md).
    """
    return cross_entropy(logits, target)
