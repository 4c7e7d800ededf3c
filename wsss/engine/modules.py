"""LightningModules: what one training step of each network does. Loops, devices, DDP, checkpoints
and logging are Lightning's job (wsss/engine/trainer.py)."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import MulticlassConfusionMatrix

from wsss.data.transforms import Normalizer
from wsss.engine.trainer import poly_schedule, sgd_with_groups
from wsss.losses import build_pixel_loss
from wsss.metrics import SegMetrics
from wsss.models.backbones import normalization
from wsss.models.cam_net import CAMNet
from wsss.models.segmenter import Segmenter


def _prepare(x: torch.Tensor, norm: Normalizer, channels_last: bool) -> torch.Tensor:
    x = norm(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class CAMModule(L.LightningModule):
    """Multi-label classification with the multi-label soft-margin loss (IRN's CAM training)."""

    def __init__(self, cfg: DictConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg.cam
        self.net = self.build_net(cfg, num_classes)
        self.norm = Normalizer(*normalization(cfg.cam.backbone))
        if self.cfg.backbone.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    @staticmethod
    def build_net(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
        """The CAM network for `cfg.cam.objective` (num_classes includes background)."""
        if cfg.cam.objective == "seam":
            from wsss.models.seam import SeamCAMNet

            return SeamCAMNet(cfg.cam.backbone, num_classes)
        return CAMNet(cfg.cam.backbone, num_classes - 1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = _prepare(batch["image"], self.norm, self.cfg.backbone.channels_last)
        if self.cfg.objective == "seam":
            from wsss.losses.seam import seam_loss

            loss, parts = seam_loss(self.net, x, batch["labels"], self.cfg.seam)
            for k, v in parts.items():
                self.log(f"train/{k}", v)
        else:
            logits = self.net(x)["logits"]
            loss = F.multilabel_soft_margin_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        opt = sgd_with_groups(self.net.parameters(), self.net.new_parameters(), self.cfg)
        sched = poly_schedule(opt, int(self.trainer.estimated_stepping_batches), self.cfg.poly_power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SegModule(L.LightningModule):
    """Segmenter training on GT, pseudo masks or scribbles, with the configured loss."""

    def __init__(self, cfg: DictConfig, num_classes: int, class_names: list[str], loss_name: Optional[str] = None):
        super().__init__()
        self.cfg = cfg.seg
        self.class_names = class_names
        self.net = Segmenter(cfg.seg, num_classes)
        self.norm = Normalizer(*normalization(cfg.seg.encoder))
        if self.cfg.encoder.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.loss_name = loss_name or cfg.seg.loss.name
        self.pixel_loss = build_pixel_loss(self.loss_name, cfg.seg.loss)
        self.regularizer = None
        if self.loss_name in ("pce_densecrf", "dfr"):
            from wsss.losses.regularized import build_regularizer

            self.regularizer = build_regularizer(self.loss_name, cfg.seg.loss, num_classes, self.net)
        self.val_confusion = MulticlassConfusionMatrix(num_classes, ignore_index=255)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = _prepare(batch["image"], self.norm, self.cfg.encoder.channels_last)
        needs_feats = self.regularizer is not None and getattr(self.regularizer, "needs_features", False)
        out = self.net(x, with_aux=self.cfg.aux_weight > 0, with_features=needs_feats)
        loss = self.pixel_loss(out["logits"], batch["target"])
        self.log("train/seg_loss", loss)
        if "aux" in out:
            aux = self.pixel_loss(out["aux"], batch["target"])
            self.log("train/aux_loss", aux)
            loss = loss + self.cfg.aux_weight * aux
        if self.regularizer is not None:
            reg, parts = self.regularizer(out, batch, self.global_step)
            for k, v in parts.items():
                self.log(f"train/{k}", v)
            loss = loss + reg
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        from wsss.engine.inference import segment_probs

        for sample in batch:
            probs = segment_probs(self, sample["image"], scales=(1.0,), flip=False)
            pred = probs.argmax(0)
            self.val_confusion.update(pred.flatten(), torch.from_numpy(np.array(sample["mask"], dtype=np.int64)).to(pred.device).flatten())

    def on_validation_epoch_end(self) -> None:
        matrix = self.val_confusion.compute().cpu().numpy()
        self.val_confusion.reset()
        metrics = SegMetrics.from_confusion(matrix, class_names=self.class_names)
        self.log("val/miou", metrics.miou, prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = sgd_with_groups(self.net.parameters(), self.net.new_parameters(), self.cfg)
        if self.regularizer is not None and hasattr(self.regularizer, "parameters"):
            extra = [p for p in self.regularizer.parameters() if p.requires_grad]
            if extra:
                opt.add_param_group({"params": extra, "lr": self.cfg.lr * self.cfg.new_layer_lr_mult})
        sched = poly_schedule(opt, int(self.trainer.estimated_stepping_batches), self.cfg.poly_power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
