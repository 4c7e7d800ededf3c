"""Segmentation method `aalr`: single-stage WSSS with Adaptive Affinity and Label Reassign losses.

Zhang et al., "Adaptive Affinity Loss and Erroneous Pseudo-Label Refinement for WSSS" (ACM MM 2021).
No official code exists: the abstract is the spec and every missing detail is our choice, written
down with its reason in docs/methods/aalr.md. One network (wsss/models/aalr.py) trained on
image-level labels only (`seg.labels: image`): per step

  cls  = MLSM(GAP(cams), y)                                   classification branch
  pseudo = cam_pseudo_labels(cams.detach())                   pseudo masks from the same forward
  [LR]  pseudo, lr = label_reassign(features, pseudo)         erroneous labels reassigned; LR loss
  ce   = CE(logits, pseudo);  [AA] aa = adaptive_affinity_loss(softmax(logits), pseudo)
  loss = cls_weight * cls + [after warm-up] seg_weight * (ce + aa_weight * aa + lr_weight * lr)

During the first `warmup_fraction` of the steps only the classification branch learns (its CAMs
are noise before that). Inference uses the segmentation head (`logits`), as every segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss.engine.modules import SegMethod
from wsss.errors import ConfigError
from wsss.io.images import IGNORE
from wsss.registry import SEG_METHODS

__all__ = ["AALR", "AALROptions"]


@dataclass
class AALROptions:
    """`seg.aalr`: pseudo masks from the classification branch, warm-up, and the AA / LR losses."""

    bg_threshold: float = 0.15  # background score against max-normalised CAMs (IRN's cam_eval_thres)
    ignore_band: list[float] = field(default_factory=list)  # [low, high]: best CAM score in it -> unlabelled
    warmup_fraction: float = 0.2  # first fraction of the steps: classification loss only
    cls_weight: float = 1.0
    seg_weight: float = 1.0  # CE on the pseudo masks (and the AA / LR terms below) after warm-up
    aa_weight: float = 1.0  # adaptive affinity loss (0 = off)
    aa_dilations: list[int] = field(default_factory=lambda: [1, 2, 4])  # neighbour offsets, in (downsampled) pixels
    aa_downsample: int = 1  # compute AA on every k-th pixel's grid (decoders predict at 1/4: k = 4 saves memory)
    lr_weight: float = 1.0  # label reassign loss (0 = off: no reassignment either)
    lr_margin: float = 0.1  # reassign when another prototype's cosine beats the label's by this much
    lr_temperature: float = 0.1  # temperature of the prototype cross entropy

    def __post_init__(self) -> None:  # runs when a recipe is loaded (config._validate_selected_options)
        if self.ignore_band and (len(self.ignore_band) != 2 or not 0 <= self.ignore_band[0] <= self.ignore_band[1] <= 1):
            raise ConfigError(f"seg.aalr.ignore_band: expected [] or [low, high] within [0, 1], got {list(self.ignore_band)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"seg.aalr.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.aa_weight > 0 and (not self.aa_dilations or min(self.aa_dilations) < 1):
            raise ConfigError("seg.aalr.aa_dilations: needs at least one positive offset")
        if self.lr_temperature <= 0:
            raise ConfigError("seg.aalr.lr_temperature: must be > 0")


@SEG_METHODS.register("aalr", options=AALROptions)
class AALR(SegMethod):
    """One network: classification branch -> pseudo masks -> segmentation branch (CE + AA + LR)."""

    warmup_steps = 0  # set when training starts (a fraction of the trainer's total steps)

    def build_net(self, seg: Any, num_classes: int, options: Any) -> nn.Module:
        from wsss.models.aalr import AALRNet

        return AALRNet(seg.arch, seg.encoder, num_classes, dict(seg.arch_kwargs))

    def on_train_start(self) -> None:
        o = self.options or AALROptions()
        self.warmup_steps = int(o.warmup_fraction * int(self.trainer.estimated_stepping_batches))

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from wsss.losses.aalr import adaptive_affinity_loss, cam_pseudo_labels, label_reassign
        from wsss.losses.ce import cross_entropy

        o = self.options or AALROptions()
        labels = batch["labels"].to(x.dtype)
        out = self.net(x, with_features=o.lr_weight > 0, with_cams=True)
        logits = out["logits"]
        cls_ = F.multilabel_soft_margin_loss(out["cams"].mean((2, 3)), labels)
        parts = {"cls": cls_.detach()}
        if self.global_step < self.warmup_steps:
            # the segmentation branch is in the graph with weight 0 (DDP wants every parameter used)
            return o.cls_weight * cls_ + 0.0 * logits.sum() + 0.0 * out.get("features", logits).sum(), parts
        pseudo = cam_pseudo_labels(out["cams"].detach(), labels, x.shape[-2:], o.bg_threshold, o.ignore_band)
        if "roi" in batch:  # padding of the crop is nobody's label
            pseudo[~batch["roi"]] = IGNORE
        seg = logits.new_zeros(())
        if o.lr_weight > 0:
            pseudo, lr = label_reassign(out["features"], pseudo, logits.shape[1], o.lr_margin, o.lr_temperature)
            seg = seg + o.lr_weight * lr
            parts["lr"] = lr.detach()
        ce = cross_entropy(logits, pseudo)
        seg = seg + ce
        parts["ce"] = ce.detach()
        if o.aa_weight > 0:
            k = max(1, o.aa_downsample)
            small = logits if k == 1 else F.interpolate(logits, scale_factor=1 / k, mode="bilinear", align_corners=False)
            aa = adaptive_affinity_loss(small.softmax(1), pseudo[:, ::k, ::k][:, : small.shape[2], : small.shape[3]],
                                        o.aa_dilations)
            seg = seg + o.aa_weight * aa
            parts["aa"] = aa.detach()
        parts["labelled"] = (pseudo != IGNORE).float().mean()
        return o.cls_weight * cls_ + o.seg_weight * seg, parts
