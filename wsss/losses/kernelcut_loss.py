"""Kernel cut loss (Tang et al., ECCV 2018): normalized cut over the dense bilateral kernel + grid-CRF Potts.

    L_KC = w_nc x L_NC(S)  +  w_grid x L_grid(S)

KernelCut (Tang et al., ICCV 2015) is the normalized-cut clustering term plus a nearest-neighbour
Potts term; the ECCV 2018 paper turns it into a loss like its other regularisers. L_NC is
wsss/losses/ncut_loss.py (dense Gaussian kernel on the lattice), L_grid is wsss/losses/potts_loss.py
(8-neighbour contrast-sensitive Potts, bilinear relaxation). Each part keeps its own options; the
defaults give each part half of the weight it has alone (docs/methods/scribbles.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from wsss.losses.ncut_loss import NCutLoss, NCutOptions, build_ncut
from wsss.losses.potts_loss import PottsLoss, PottsOptions, build_potts
from wsss.registry import REGULARIZERS


@dataclass
class KernelCutOptions:
    """`seg.loss.kernelcut.*`: the normalized-cut part (`ncut.*`) and the grid Potts part (`potts.*`)."""

    ncut: NCutOptions = field(default_factory=lambda: NCutOptions(weight=0.5 * NCutOptions.weight))
    potts: PottsOptions = field(default_factory=lambda: PottsOptions(weight=0.5 * PottsOptions.weight))


class KernelCutLoss(nn.Module):
    """L_NC + L_grid (each weighted by its own module) of softmax probabilities (B, C, H, W) -> (total, ncut, potts)."""

    def __init__(self, ncut: NCutLoss, potts: PottsLoss):
        super().__init__()
        self.ncut, self.potts = ncut, potts
        self.needs_labels = ncut.needs_labels

    def forward(self, probs: Tensor, image: Tensor, roi: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """labels (B, C - 1): image tags for the normalized cut's classes="present" -> (weighted total,
        weighted normalized-cut part, weighted Potts part), scalars."""
        nc = self.ncut(probs, image, roi, labels)
        grid = self.potts(probs, image, roi)
        return nc + grid, nc, grid


def build_kernelcut(opts: KernelCutOptions) -> KernelCutLoss:
    """The loss module of `seg.loss.kernelcut` options."""
    return KernelCutLoss(build_ncut(opts.ncut), build_potts(opts.potts))


__all__ = ["KernelCutLoss", "KernelCutOptions", "build_kernelcut"]


@REGULARIZERS.register("kernelcut", options=KernelCutOptions)
def kernelcut(options: KernelCutOptions, context: Any = None) -> nn.Module:
    """The kernel cut loss (normalized cut + grid Potts) as a regulariser (`seg.loss.regularizer: kernelcut`)."""
    from wsss.losses.regularized import ProbabilityRegularizer

    return ProbabilityRegularizer(build_kernelcut(options), ("kernelcut_loss", "ncut_loss", "potts_loss"))
