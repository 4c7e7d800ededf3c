"""Regularised losses added to pCE for scribble supervision (`seg.loss.name`: pce_densecrf | dfr).

A regulariser is an nn.Module called as `reg(out, batch, global_step) -> (loss, {name: value})`, with
`out` the segmenter output (`logits` (N, C, H, W), plus `features` when `needs_features`) and `batch`
the training batch (`image` (N, 3, H, W) 0..255, `target` (N, H, W), `roi` (N, H, W) bool). Its
parameters (the DFR consistency head) are trained with the segmenter (SegModule adds them).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from wsss.losses.densecrf_loss import DenseCRFLoss
from wsss.losses.dfr import DFRLoss


def _densecrf(cfg: Any) -> DenseCRFLoss:
    return DenseCRFLoss(cfg.weight, cfg.sigma_rgb, cfg.sigma_xy, cfg.scale)


class DenseCRFRegularizer(nn.Module):
    """pCE + DenseCRF loss: the rloss recipe."""

    needs_features = False

    def __init__(self, densecrf_cfg: Any):
        super().__init__()
        self.crf = _densecrf(densecrf_cfg)

    def forward(self, out: dict[str, Tensor], batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.crf(out["logits"].softmax(1), batch["image"], batch.get("roi"))
        return loss, {"densecrf_loss": loss.detach()}


class DFRRegularizer(nn.Module):
    """pCE + (optionally) the DenseCRF loss at full resolution + the DFR grid terms (wsss/losses/dfr.py)."""

    needs_features = True

    def __init__(self, loss_cfg: Any, num_classes: int, feature_channels: int):
        super().__init__()
        d = loss_cfg.dfr
        self.crf = _densecrf(loss_cfg.densecrf) if d.densecrf and loss_cfg.densecrf.weight > 0 else None
        self.dfr = DFRLoss(feature_channels, num_classes, weight=d.weight, sigma_xy=d.sigma_xy, sigma_rgb=d.sigma_rgb,
                           sigma_deep=d.sigma_deep, size=d.size, feature_dim=d.feature_dim, head_channels=d.head_channels,
                           consistency_weight=d.consistency_weight, confidence=d.confidence, warmup_steps=d.warmup_steps)

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


def decoder_channels(net: nn.Module) -> int:
    """Channels of the decoder output that the segmentation head reads (smp models and vitseg)."""
    head = getattr(getattr(net, "model", net), "segmentation_head", None)
    if head is not None:
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
    raise ValueError("cannot find the segmentation head's input channels of this network")


def build_regularizer(loss_name: str, loss_cfg: Any, num_classes: int, net: nn.Module) -> nn.Module:
    """The regulariser for `seg.loss.name` (pce_densecrf | dfr)."""
    if loss_name == "pce_densecrf":
        return DenseCRFRegularizer(loss_cfg.densecrf)
    if loss_name == "dfr":
        return DFRRegularizer(loss_cfg, num_classes, decoder_channels(net))
    raise ValueError(f"no regulariser for loss {loss_name!r}")


__all__ = ["DenseCRFRegularizer", "DFRRegularizer", "build_regularizer", "decoder_channels"]
