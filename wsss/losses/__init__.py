"""Segmentation losses by name: a pixel loss (`seg.loss.name`) plus an optional regulariser
(`seg.loss.regularizer`, wsss/losses/regularized.py).

A pixel loss is registered in `PIXEL_LOSSES` as a factory `options -> loss`, where
`loss(logits (N, C, H, W), target (N, H, W) with 255 = ignore) -> scalar` and `options` is its
section `seg.loss.<name>` (a dataclass instance, or None).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from wsss.losses.ce import cross_entropy, partial_cross_entropy
from wsss.losses.puf import PUFOptions, pretended_under_fitting
from wsss.registry import PIXEL_LOSSES

PixelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["PIXEL_LOSSES", "PixelLoss", "build_pixel_loss"]


@PIXEL_LOSSES.register("ce")
def ce(options: Any = None) -> PixelLoss:
    """Cross-entropy over labelled pixels (pseudo masks, GT)."""
    return cross_entropy


@PIXEL_LOSSES.register("pce")
def pce(options: Any = None) -> PixelLoss:
    """Partial cross-entropy over scribble pixels only."""
    return partial_cross_entropy


@PIXEL_LOSSES.register("puf", options=PUFOptions)
def puf(options: PUFOptions) -> PixelLoss:
    """PMM's Pretended Under-Fitting loss."""
    return lambda logits, target: pretended_under_fitting(logits, target, options.type, options.beta, options.k)


def build_pixel_loss(name: str, options: Any = None) -> PixelLoss:
    """The pixel loss registered as `name`, from its options (None: the defaults)."""
    factory = PIXEL_LOSSES.get(name)
    opts = PIXEL_LOSSES.options.get(name)
    return factory(options if options is not None or opts is None else opts())


# registers the regularisers (densecrf, dfr, ncut, potts, kernelcut)
from wsss.losses import kernelcut_loss, ncut_loss, potts_loss, regularized  # noqa: E402,F401
