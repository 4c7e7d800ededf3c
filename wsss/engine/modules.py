"""Segmentation methods by name (`seg.method`): a network, its training step and its inference.

A segmentation method is a LightningModule subclass registered in `SEG_METHODS`. The stages
(`train_seg`, `cyclic`, `evaluate`, `predict`) build it from plain arguments and never look at which
method it is. The built-in `segmenter` is any segmentation_models_pytorch architecture (or `vitseg`)
trained with a pixel loss and an optional regulariser (wsss/losses). Loops, devices, DDP,
checkpoints and logging are Lightning's job (wsss/engine/trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from wsss.engine.method import TrainableMethod
from wsss.engine.trainer import poly_schedule, sgd_with_groups
from wsss.losses import build_pixel_loss
from wsss.metrics import ConfusionMatrix
from wsss.registry import SEG_METHODS

__all__ = ["SEG_METHODS", "LossSpec", "SegMethod", "SmpSegmenter"]


@dataclass(frozen=True)
class LossSpec:
    """The segmenter's loss as plain values: a pixel loss and an optional regulariser, with their options."""

    pixel: str = "ce"
    pixel_options: Any = None
    regularizer: str = ""
    regularizer_options: Any = None
    uses: dict[str, Any] = field(default_factory=dict)  # other loss sections the regulariser reads


class SegMethod(TrainableMethod):
    """Base of segmentation methods: `net` (forward -> {"logits": (N, C, H, W), ...}), its loss, validation."""

    val_metric = "val/miou"  # what validation logs; train_segmenter sets holdout/miou when it validates the held-out part
    val_memo_bytes = 1 << 30  # validation images' frozen-encoder features kept in memory (EncoderMemo)

    def __init__(self, seg: Any, num_classes: int, class_names: list[str], loss: Optional[LossSpec] = None,
                 options: Any = None):
        """seg: the plain `seg` section (arch, encoder, optimiser values); loss: None at inference."""
        self.seg, self.options, self.class_names = seg, options, class_names
        super().__init__(seg.encoder, self.build_net(seg, num_classes, options))
        self.loss_spec = loss
        self.val_confusion = ConfusionMatrix(num_classes)  # the evaluation's own (monitoring only, per process)

    # ---- what a method defines ------------------------------------------------------------
    def build_net(self, seg: Any, num_classes: int, options: Any) -> nn.Module:
        """The network (with `new_parameters()`)."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised images x (N, 3, H, W) and the batch (target (N, H, W), ...) -> (loss, logged parts)."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> class logits (N, C, H, W) for inference."""
        return self.net(x)["logits"]

    # ---- shared -------------------------------------------------------------------------------
    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        from wsss.engine.inference import segment_probs

        reader = self.validation_reader()
        for sample in batch:
            if reader is not self:
                reader.key = sample["id"]
            pred = segment_probs(reader, sample["image"], scales=(1.0,), flip=False).argmax(0)
            self.val_confusion.update(pred, np.asarray(sample["mask"]))

    def validation_reader(self) -> Any:
        """What validation predicts with: with a frozen encoder, an EncoderMemo that encodes each image once
        per training run (the same images come back every epoch), else the method itself."""
        if not hasattr(self, "_val_memo"):
            from wsss.engine.feature_cache import probe_levels
            from wsss.engine.inference import EncoderMemo

            encoder = self.cacheable_encoder()
            self._val_memo = None if encoder is None else EncoderMemo(self, encoder, probe_levels(self)[1],
                                                                      self.val_memo_bytes)
        return self._val_memo or self

    def on_validation_epoch_end(self) -> None:
        miou = self.val_confusion.compute(self.class_names).miou
        self.val_confusion = ConfusionMatrix(self.val_confusion.num_classes)
        self.log(self.val_metric, miou, prog_bar=True)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside `net` (e.g. a regulariser's head), trained at the new-layer rate."""
        return []

    def cacheable_encoder(self) -> Optional[nn.Module]:
        """The encoder whose features training may read from a cache (wsss/engine/feature_cache.py): one
        that never changes while training, and only for a method whose `loss` reads `batch["features"]`."""
        return None

    def decode_cached(self, x: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything after the encoder: (N, 3, H, W) images and their encoder features -> the net's outputs."""
        raise NotImplementedError

    def cached_features(self, batch: dict[str, Any], like: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """The batch's cached encoder features (float16 on the loader side) in `like`'s dtype and memory format."""
        features = batch.get("features")
        if features is None:
            return None
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [f.to(like.dtype).contiguous(memory_format=fmt) if f.dim() == 4 else f for f in features]

    def configure_optimizers(self) -> dict[str, Any]:
        opt = sgd_with_groups(self.net.parameters(), self.net.new_parameters(), self.seg)
        extra = [p for p in self.extra_parameters() if p.requires_grad]
        if extra:
            opt.add_param_group({"params": extra, "lr": self.seg.lr * self.seg.new_layer_lr_mult})
        sched = poly_schedule(opt, int(self.trainer.estimated_stepping_batches), self.seg.poly_power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@SEG_METHODS.register("segmenter")
class SmpSegmenter(SegMethod):
    """Any smp architecture on a timm encoder (or `vitseg`), optional FCN aux head, pixel loss + regulariser."""

    def __init__(self, seg: Any, num_classes: int, class_names: list[str], loss: Optional[LossSpec] = None,
                 options: Any = None):
        super().__init__(seg, num_classes, class_names, loss, options)
        self.pixel_loss = self.regularizer = None
        if loss is not None:
            self.pixel_loss = build_pixel_loss(loss.pixel, loss.pixel_options)
            if loss.regularizer:
                from wsss.losses.regularized import RegularizerContext, build_regularizer, decoder_channels

                context = RegularizerContext(num_classes, decoder_channels(self.net), dict(loss.uses))
                self.regularizer = build_regularizer(loss.regularizer, loss.regularizer_options, context)

    def build_net(self, seg: Any, num_classes: int, options: Any) -> nn.Module:
        from wsss.models.segmenter import Segmenter

        return Segmenter(seg.arch, seg.encoder, num_classes, dict(seg.arch_kwargs), aux_head=seg.aux_weight > 0)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        needs_feats = self.regularizer is not None and getattr(self.regularizer, "needs_features", False)
        out = self.net(x, with_aux=self.seg.aux_weight > 0, with_features=needs_feats,
                       encoded=self.cached_features(batch, x))
        loss = self.pixel_loss(out["logits"], batch["target"])
        parts = {"seg_loss": loss.detach()}
        if "aux" in out:
            aux = self.pixel_loss(out["aux"], batch["target"])
            parts["aux_loss"] = aux.detach()
            loss = loss + self.seg.aux_weight * aux
        if self.regularizer is not None:
            reg, reg_parts = self.regularizer(out, batch, self.global_step)
            parts.update(reg_parts)
            loss = loss + reg
        return loss, parts

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.regularizer.parameters()) if self.regularizer is not None else []

    def cacheable_encoder(self) -> Optional[nn.Module]:
        return self.net.frozen_encoder()

    def decode_cached(self, x: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.net(x, with_aux=True, with_features=True, encoded=features)
