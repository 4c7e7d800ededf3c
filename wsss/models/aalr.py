"""AA&LR's single network: a segmentation network whose encoder also feeds a classification branch.

The segmenter is wsss's `Segmenter` (any smp architecture on a timm encoder); the classification
branch is a 1x1 classifier over the foreground classes on the encoder's last stage (the CAM of
IRN-style classifiers), global-average-pooled for the image-level loss. Its CAMs make the pseudo
masks (wsss/losses/aalr.py) that supervise the segmentation head of the same forward pass.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from wsss.models.segmenter import Segmenter


class AALRNet(Segmenter):
    """Segmenter + classification branch; forward -> {"logits" (N, C, H, W)[, "cams" (N, C-1, h, w)][, "features"]}."""

    def __init__(self, arch: str, encoder: Any, num_classes: int, arch_kwargs: Optional[dict[str, Any]] = None):
        super().__init__(arch, encoder, num_classes, arch_kwargs, aux_head=False)
        self.classifier = nn.Conv2d(self.model.encoder.out_channels[-1], num_classes - 1, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def new_parameters(self) -> list[nn.Parameter]:
        return super().new_parameters() + list(self.classifier.parameters())

    def forward(self, x: torch.Tensor, with_aux: bool = False, with_features: bool = False,
                with_cams: bool = False) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> segmentation logits at input size, plus the CAMs and decoder features on request."""
        features, decoded, logits = self.encode_decode(x)
        out = {"logits": logits}
        if with_cams:
            out["cams"] = self.classifier(features[-1])
        if with_features:
            out["features"] = decoded
        return out
