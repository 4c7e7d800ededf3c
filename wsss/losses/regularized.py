"""Regularisers added to the pixel loss (`seg.loss.regularizer`: densecrf | dfr | ...), by name.

A regulariser is an nn.Module called as `reg(out, batch, global_step) -> (loss, {name: value})`, with
`out` the segmenter output (`logits` (N, C, H, W), plus `features` when `needs_features`) and `batch`
the training batch (`image` (N, 3, H, W) 0..255, `target` (N, H, W), `roi` (N, H, W) bool). Its
parameters (the DFR consistency head) are trained with the segmenter (the segmentation method adds
them). It is registered in `REGULARIZERS` as a factory `(options, context) -> nn.Module`, where
`options` is its section `seg.loss.<name>` and `context` gives num_classes, feature_channels and the
other loss sections it declared in `uses`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from wsss.losses.densecrf_loss import DenseCRFLoss, DenseCRFLossOptions
from wsss.losses.dfr import DFRLoss, DFROptions
from wsss.registry import REGULARIZERS


@dataclass(frozen=True)
class RegularizerContext:
    """What a regulariser factory may need besides its options."""

    num_classes: int
    feature_channels: int = 0  # channels of the decoder features (`out["features"]`)
    options: dict[str, Any] = field(default_factory=dict)  # other loss sections it `uses`, by name


def _densecrf(o: DenseCRFLossOptions) -> DenseCRFLoss:
    return DenseCRFLoss(o.weight, o.sigma_rgb, o.sigma_xy, o.scale)


class ProbabilityRegularizer(nn.Module):
    """pCE + a loss of the softmax alone, `loss(probs (N, C, H, W), image (N, 3, H, W), roi (N, H, W))`: the
    DenseCRF loss (the rloss recipe), the normalized cut, the grid Potts and the kernel cut losses.

    parts: the logged names of what the loss returns, one scalar or a tuple (total, part, ...).
    """

    needs_features = False

    def __init__(self, loss: nn.Module, parts: tuple[str, ...]):
        super().__init__()
        self.loss, self.parts = loss, parts

    def forward(self, out: dict[str, Tensor], batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        args = (out["logits"].softmax(1), batch["image"], batch.get("roi"))
        # a loss over the image's own classes (the normalized cut's classes="present") reads its tags
        value = self.loss(*args, labels=batch["labels"]) if getattr(self.loss, "needs_labels", False) else self.loss(*args)
        values = value if isinstance(value, tuple) else (value,)
        return values[0], {name: v.detach() for name, v in zip(self.parts, values)}


class DFRRegularizer(nn.Module):
    """pCE + (optionally) the DenseCRF loss at full resolution + the DFR grid terms (wsss/losses/dfr.py)."""

    needs_features = True

    def __init__(self, d: DFROptions, densecrf: DenseCRFLossOptions, num_classes: int, feature_channels: int):
        super().__init__()
        self.crf = _densecrf(densecrf) if d.densecrf and densecrf.weight > 0 else None
        self.dfr = DFRLoss(feature_channels, num_classes, weight=d.weight, sigma_xy=d.sigma_xy, sigma_rgb=d.sigma_rgb,
                           sigma_deep=d.sigma_deep, size=d.size, feature_dim=d.feature_dim, head_channels=d.head_channels,
                           consistency_weight=d.consistency_weight, confidence=d.confidence, warmup_steps=d.warmup_steps,
                           prediction_labels_from_step=d.prediction_labels_from_step)

    def forward(self, out: dict[str, Tensor], batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        if "features" not in out:
            raise KeyError("the DFR loss needs the decoder features: call the segmenter with with_features=True")
        roi = batch.get("roi")
        probs = out["logits"].softmax(1)  # shared by both terms
        loss, parts = self.dfr(probs, out["features"], batch["image"], batch["target"], roi, step)
        if self.crf is not None:
            crf = self.crf(probs, batch["image"], roi)
            parts["densecrf_loss"] = crf.detach()
            loss = loss + crf
        return loss, parts


@REGULARIZERS.register("densecrf", options=DenseCRFLossOptions)
def densecrf(options: DenseCRFLossOptions, context: Any = None) -> nn.Module:
    """The DenseCRF loss (Tang et al. 2018)."""
    return ProbabilityRegularizer(_densecrf(options), ("densecrf_loss",))


@REGULARIZERS.register("dfr", options=DFROptions, uses=("densecrf",))
def dfr(options: DFROptions, context: RegularizerContext) -> nn.Module:
    """The Dynamic Feature Regularized loss (+ the DenseCRF loss of seg.loss.densecrf when options.densecrf)."""
    return DFRRegularizer(options, context.options.get("densecrf") or DenseCRFLossOptions(),
                          context.num_classes, context.feature_channels)


def decoder_channels(net: nn.Module) -> int:
    """Channels of the decoder output that the segmentation head reads (smp models and vitseg)."""
    head = getattr(getattr(net, "model", net), "segmentation_head", None)
    if head is not None:
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
    raise ValueError("cannot find the segmentation head's input channels of this network")


def build_regularizer(name: str, options: Any, context: RegularizerContext) -> nn.Module:
    """The regulariser registered as `name` (options None: its defaults)."""
    opts = REGULARIZERS.options.get(name)
    return REGULARIZERS.get(name)(options if options is not None or opts is None else opts(), context)


__all__ = ["DFRRegularizer", "ProbabilityRegularizer", "RegularizerContext", "build_regularizer", "decoder_channels"]
