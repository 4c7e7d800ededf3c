"""CAM methods by name (`cam.method`): a network, its training step and its CAMs at inference.

A CAM method is a LightningModule subclass registered in `CAM_METHODS`; the stages `train_cam`
and `cam` build it from plain arguments and never look at which method it is:

    @CAM_METHODS.register("my_cam", options=MyOptions)   # options: the recipe section cam.my_cam
    class MyCAM(CamMethod):
        def build_net(self, backbone, num_classes, options): ...   # -> nn.Module with new_parameters()
        def loss(self, x, batch): ...                             # -> (loss, {name: value})
        def cams(self, x, output="cam"): ...                      # -> raw foreground CAMs (N, K, h, w)

`train_loader` is the data hook (a group sampler, paired views, ...) and `callbacks` adds Lightning
callbacks (e.g. maps accumulated during training). Loops, devices, DDP and checkpoints are Lightning's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from wsss.engine.method import TrainableMethod
from wsss.engine.trainer import poly_schedule, sgd_with_groups
from wsss.errors import ConfigError
from wsss.registry import CAM_METHODS

__all__ = ["CAM_METHODS", "CamMethod", "MultiLabelSoftMargin", "Seam", "SeamOptions"]


class CamMethod(TrainableMethod):
    """Base of CAM methods: `net` on a timm backbone, images normalised for it, SGD with 10x new layers."""

    def __init__(self, backbone: Any, num_classes: int, optim: Any = None, options: Any = None):
        """backbone: BackboneConfig-like; num_classes includes background; optim: lr, momentum, weight_decay,
        new_layer_lr_mult, poly_power; options: the method's own section (a dataclass instance) or None."""
        self.optim, self.options = optim, options
        super().__init__(backbone, self.build_net(backbone, num_classes, options))

    # ---- what a method defines ------------------------------------------------------------
    def build_net(self, backbone: Any, num_classes: int, options: Any) -> nn.Module:
        """The network (with `new_parameters()`); num_classes includes background."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised images x (N, 3, H, W) and the batch (labels (N, K) multi-hot) -> (loss, logged parts)."""
        raise NotImplementedError

    def cams(self, x: torch.Tensor, output: str = "cam") -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> raw foreground CAMs (N, K, h, w) (`output` names a variant)."""
        raise NotImplementedError

    def configure_optimizers(self) -> dict[str, Any]:
        opt = sgd_with_groups(self.net.parameters(), self.net.new_parameters(), self.optim)
        sched = poly_schedule(opt, int(self.trainer.estimated_stepping_batches), self.optim.poly_power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _only_cam_output(method: str, output: str) -> None:
    if output != "cam":
        raise ConfigError(f"cam_infer.output: {output!r} is not an output of cam.method={method} (it has: cam)")


@CAM_METHODS.register("mlsm")
class MultiLabelSoftMargin(CamMethod):
    """IRN's CAM training: GAP + 1x1 classifier, multi-label soft-margin loss."""

    def build_net(self, backbone: Any, num_classes: int, options: Any) -> nn.Module:
        from wsss.models.cam_net import CAMNet

        return CAMNet(backbone, num_classes - 1)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.multilabel_soft_margin_loss(self.net(x)["logits"], batch["labels"]), {}

    def cams(self, x: torch.Tensor, output: str = "cam") -> torch.Tensor:
        _only_cam_output("mlsm", output)
        return self.net(x)["cams"]


@dataclass
class SeamOptions:
    """`cam.seam`: the SEAM-style objective of PMM's CAM stage (equivariance + PCM)."""

    view_scale: float = 0.3  # second view downscaled by this factor
    ecr_topk: float = 0.2  # OHEM fraction for the equivariant cross regularisation
    amp_weight: float = 1.0  # adaptive min pooling term on the PCM output


@CAM_METHODS.register("seam", options=SeamOptions)
class Seam(CamMethod):
    """SEAM-style CAMs with a Pixel Correlation Module (PMM's CAM stage); `cam_rv` is the PCM-refined map."""

    def build_net(self, backbone: Any, num_classes: int, options: Optional[SeamOptions]) -> nn.Module:
        from wsss.models.seam import SeamCAMNet

        return SeamCAMNet(backbone, num_classes)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from wsss.losses.seam import seam_loss

        return seam_loss(self.net, x, batch["labels"], self.options or SeamOptions())

    def cams(self, x: torch.Tensor, output: str = "cam") -> torch.Tensor:
        if output not in ("cam", "cam_rv"):
            raise ConfigError(f"cam_infer.output: {output!r} is not an output of cam.method=seam (it has: cam, cam_rv)")
        return self.net.infer_cams(x, output)
