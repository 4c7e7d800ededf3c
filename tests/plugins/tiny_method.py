"""A plug-in as a researcher writes one: a CAM method and a segmentation method in one file outside the
package, registered by name and picked by a recipe (`run.plugins: [path/to/tiny_method.py]`).

docs/architecture.md ("Add a method in one file") walks through this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam.methods import CamMethod
from wsss.engine.modules import SegMethod
from wsss.registry import CAM_METHODS, SEG_METHODS


def _stem(width: int) -> nn.Sequential:
    """Two strided 3x3 convolutions: (N, 3, H, W) -> (N, width, H/4, W/4)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())


class TinyCAMNet(nn.Module):
    """A two-layer CNN whose 1x1 classifier, applied densely, gives CAMs."""

    def __init__(self, width: int, num_fg: int):
        super().__init__()
        self.stem, self.classifier = _stem(width), nn.Conv2d(width, num_fg, 1)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())  # everything is new: no pretrained part

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cams = self.classifier(self.stem(x))
        return {"cams": cams, "logits": cams.mean((2, 3))}


@dataclass
class TinyCAMOptions:
    """Recipe section `cam.tiny_cam`."""

    width: int = 8


@CAM_METHODS.register("tiny_cam", options=TinyCAMOptions)
class TinyCAM(CamMethod):
    """Multi-label soft-margin on a tiny CNN; the recipe's backbone is ignored."""

    def build_net(self, backbone: Any, num_classes: int, options: TinyCAMOptions) -> nn.Module:
        return TinyCAMNet(options.width, num_classes - 1)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.multilabel_soft_margin_loss(self.net(x)["logits"], batch["labels"]), {}

    def cams(self, x: torch.Tensor, output: str = "cam") -> torch.Tensor:
        return self.net(x)["cams"]


class TinySegNet(nn.Module):
    """The same stem with a 1x1 classifier, upsampled to the input size."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.stem, self.head = _stem(width), nn.Conv2d(width, num_classes, 1)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = F.interpolate(self.head(self.stem(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits}


@SEG_METHODS.register("tiny_seg")
class TinySeg(SegMethod):
    """Cross-entropy on the training target (pseudo masks, GT or scribbles), 255 ignored."""

    def build_net(self, seg: Any, num_classes: int, options: Any) -> nn.Module:
        return TinySegNet(8, num_classes)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(self.net(x)["logits"], batch["target"], ignore_index=255), {}
