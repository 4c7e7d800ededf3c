"""The CAM network: a timm backbone, global average pooling and a 1x1 classifier (IRN-style)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import create_backbone, set_bn_eval


class CAMNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier applied densely gives class activation maps."""

    def __init__(self, backbone_cfg: Any, num_classes: int):
        super().__init__()
        self.backbone = create_backbone(backbone_cfg, out_indices=(-1,))
        self.freeze_bn = bool(backbone_cfg.freeze_bn)
        channels = self.backbone.feature_info.channels()[-1]
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        if self.freeze_bn:
            set_bn_eval(self.backbone)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of layers that are not pretrained (trained with a larger learning rate)."""
        return list(self.classifier.parameters())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D, h, w) last-stage features."""
        return self.backbone(x)[-1]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> logits (N, K) and raw CAMs (N, K, h, w)."""
        feats = self.features(x)
        cams = self.classifier(feats)
        logits = F.adaptive_avg_pool2d(cams, 1).flatten(1)  # GAP before or after the 1x1 conv: same thing
        return {"logits": logits, "cams": cams}

    def train(self, mode: bool = True) -> "CAMNet":
        super().train(mode)
        if self.freeze_bn:
            set_bn_eval(self.backbone)
        return self
