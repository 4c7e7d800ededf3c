"""SEAM-style CAM network with Pixel Correlation Module (PCM), as PMM's CAM stage uses it.

PMM `network/scalenet_SEAM.py::Net` (ResNet-38 / ScaleNet-101): a 1x1 classifier over C classes
*including background* on the last stage, and a PCM that propagates a one-hot-ised, max-normalised
copy of the CAM (no gradient) with a feature affinity learned from two intermediate stages.
On timm backbones the intermediate stages are the third- and second-to-last feature stages
(ResNets: layer2 and layer3, as the official ScaleNet-101 uses), projected to 64 and 128 channels.
The official ResNet-38 version puts Dropout2d(0.5) before the classifier; the ScaleNet version used
for PMM's final CAMs does not, and neither do we.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import create_backbone, set_bn_eval


def pcm_input(cams: torch.Tensor) -> torch.Tensor:
    """Raw CAMs (N, C, h, w), channel 0 background -> the map PCM propagates (no gradient).

    Max-normalise each channel, replace background by 1 - max foreground, and keep in every pixel
    only the strongest foreground class (the others zeroed), as the official forward does.
    """
    with torch.no_grad():
        n, c = cams.shape[:2]
        d = F.relu(cams)
        peak = d.flatten(2).amax(2).view(n, c, 1, 1) + 1e-5
        d = F.relu(d - 1e-5) / peak
        fg = d[:, 1:]
        fg_max = fg.amax(1, keepdim=True)
        fg = torch.where(fg < fg_max, torch.zeros_like(fg), fg)
        return torch.cat([1.0 - fg_max, fg], 1)


def pcm(cams: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Pixel correlation: cams (N, C, h, w), embedded features (N, D, h, w) -> refined (N, C, h, w).

    Affinity A = relu(f^T f) of L2-normalised features, each column divided by its sum, and
    cam_rv = cam @ A: every pixel becomes an affinity-weighted average of the CAM.
    """
    n, c, h, w = cams.shape
    f = features.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + 1e-5)
    aff = F.relu(torch.bmm(f.transpose(1, 2), f))  # (N, hw, hw)
    aff = aff / (aff.sum(1, keepdim=True) + 1e-5)
    return torch.bmm(cams.flatten(2), aff).view(n, c, h, w)


class SeamCAMNet(nn.Module):
    """CAM classifier over background + foreground classes with a PCM branch (SEAM / PMM)."""

    def __init__(self, backbone_cfg: Any, num_classes: int):
        super().__init__()
        self.backbone = create_backbone(backbone_cfg, out_indices=(-3, -2, -1))
        self.freeze_bn = bool(backbone_cfg.freeze_bn)
        mid, deep, last = self.backbone.feature_info.channels()
        self.classifier = nn.Conv2d(last, num_classes, 1, bias=False)  # official fc8
        self.proj_mid = nn.Conv2d(mid, 64, 1, bias=False)  # f8_3
        self.proj_deep = nn.Conv2d(deep, 128, 1, bias=False)  # f8_4
        self.embed = nn.Conv2d(3 + 64 + 128, 192, 1, bias=False)  # f9
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.kaiming_normal_(self.proj_mid.weight)
        nn.init.kaiming_normal_(self.proj_deep.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)
        if self.freeze_bn:
            set_bn_eval(self.backbone)

    def new_parameters(self) -> list[nn.Parameter]:
        """Layers trained from scratch (the official 10x / 20x learning-rate groups)."""
        return [p for m in (self.classifier, self.proj_mid, self.proj_deep, self.embed) for p in m.parameters()]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images (N, 3, H, W) -> raw "cam" and PCM-refined "cam_rv", both (N, C, h, w) at feature size."""
        mid, deep, last = self.backbone(x)
        cam = self.classifier(last)
        size = cam.shape[-2:]
        # Backbone features are detached: the affinity branch must not reshape the classifier's features.
        feats = [F.interpolate(x, size, mode="bilinear", align_corners=True),
                 F.relu(self.proj_mid(_resize(mid.detach(), size))),
                 F.relu(self.proj_deep(_resize(deep.detach(), size)))]
        cam_rv = pcm(pcm_input(cam), self.embed(torch.cat(feats, 1)))
        return {"cam": cam, "cam_rv": cam_rv}

    def infer_cams(self, x: torch.Tensor, output: str = "cam_rv") -> torch.Tensor:
        """(N, 3, H, W) -> foreground maps (N, C - 1, h, w): raw CAMs ("cam") or the PCM output ("cam_rv")."""
        if output not in ("cam", "cam_rv"):
            raise ValueError(f"output must be 'cam' or 'cam_rv', got {output!r}")
        return self(x)[output][:, 1:]

    def train(self, mode: bool = True) -> "SeamCAMNet":
        super().train(mode)
        if self.freeze_bn:
            set_bn_eval(self.backbone)
        return self


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bring an intermediate stage to the CAM's grid (no-op at equal output stride, as in the official OS-8 nets)."""
    return x if x.shape[-2:] == size else F.interpolate(x, size, mode="bilinear", align_corners=False)
