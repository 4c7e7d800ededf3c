"""AuxSegNet (Xu et al., ICCV 2021): classification, saliency and segmentation on one timm backbone,
task-specific non-local affinities and their learned cross-task fusion.

Shapes: the backbone's last stage gives features (N, D, h, w); an affinity is (N, hw, hw) with rows
summing to 1 (softmax over positions). The hw x hw maps are the memory cost: `affinity_bytes`.
The official network (`network/AuxSegNet.py::Net`) is ResNet-38 with 128-channel branches and
dilations 6 / 12 / 18; docs/methods/auxsegnet.md maps every part to it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import create_backbone, set_bn_eval


def affinity_bytes(h: int, w: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes of ONE (batch, hw, hw) affinity map at feature size h x w (training keeps ~10 such maps alive)."""
    return batch * (h * w) ** 2 * dtype_bytes


def propagate(affinity: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Refine maps (N, C, h, w) by an affinity (N, hw, hw): out[:, :, i] = sum_j A[i, j] maps[:, :, j]."""
    n, c, h, w = maps.shape
    flat = maps.reshape(n, c, h * w).float()
    return torch.bmm(flat, affinity.float().transpose(1, 2)).reshape(n, c, h, w).to(maps.dtype)


class TaskAffinity(nn.Module):
    """Non-local affinity of one task: softmax_j(theta(F)_i . phi(F)_j), (N, C, h, w) -> (N, hw, hw).

    As in the official NLBlock, there is no 1/sqrt(d) scaling before the softmax.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.theta = nn.Conv2d(channels, channels, 1)
        self.phi = nn.Conv2d(channels, channels, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, c = feats.shape[:2]
        theta = self.theta(feats).reshape(n, c, -1).transpose(1, 2)  # (N, hw, C)
        phi = self.phi(feats).reshape(n, c, -1)  # (N, C, hw)
        return torch.softmax(torch.bmm(theta, phi), dim=-1)


class CrossTaskFusion(nn.Module):
    """Fuse two affinities (N, hw, hw) with per-pair weights w1 + w2 = 1 learned from both.

    The stacked maps (N, 2, hw, hw) go through conv3x3 (no bias) -> ReLU -> conv1x1 -> softmax over the
    two channels (official `cross_att`). A per-pair convex combination of two row-stochastic maps
    need not have rows summing to 1; `renormalize` divides each row by its sum so that it does
    (the official code does not: seg.auxsegnet.renormalize_cross=false).
    """

    def __init__(self, renormalize: bool = True):
        super().__init__()
        self.weights = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(2, 2, 1))
        self.renormalize = renormalize

    def forward(self, a_seg: torch.Tensor, a_sal: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([a_seg, a_sal], 1)  # (N, 2, hw, hw)
        w = torch.softmax(self.weights(stacked), dim=1)
        fused = (stacked * w).sum(1)
        if self.renormalize:
            fused = fused / fused.sum(-1, keepdim=True).clamp_min(1e-12)
        return fused


class DenseBranch(nn.Module):
    """One dense task branch: two dilated 3x3 convs -> features refined by their own affinity
    (F + W(A g(F))) -> a third dilated 3x3 conv -> 1x1 head. (N, D, h, w) -> logits (N, out, h, w), A."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, rates: Sequence[int]):
        super().__init__()
        r1, r2, r3 = rates
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=r1, dilation=r1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=r2, dilation=r2)
        self.affinity = TaskAffinity(channels)
        self.g = nn.Conv2d(channels, channels, 1)
        self.w = nn.Conv2d(channels, channels, 1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=r3, dilation=r3)
        self.head = nn.Conv2d(channels, out_channels, 1, bias=False)
        for conv in (self.conv1, self.conv2, self.conv3, self.head):  # official: xavier on these layers
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = F.relu(self.conv2(F.relu(self.conv1(x))))
        aff = self.affinity(feats)
        feats = feats + self.w(propagate(aff, self.g(feats)))
        return self.head(F.relu(self.conv3(feats))), aff


class AuxSegNetwork(nn.Module):
    """Shared backbone + classification (CAMs) + saliency + segmentation branches + cross-task affinity.

    saliency_task=False drops the saliency branch (the cross-task affinity is then the segmentation
    affinity alone); cross_affinity=False skips refining the predictions (`seg` = `init_seg`).
    """

    def __init__(self, backbone_cfg: Any, num_classes: int, channels: int = 128, rates: Sequence[int] = (6, 12, 18),
                 saliency_task: bool = True, cross_affinity: bool = True, renormalize_cross: bool = True,
                 dropout: float = 0.5):
        super().__init__()
        self.backbone = create_backbone(backbone_cfg, out_indices=(-1,))
        self.freeze_bn = bool(backbone_cfg.freeze_bn)
        dim = self.backbone.feature_info.channels()[-1]
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes - 1, 1, bias=False)  # named like CAMNet's: loads from cam/
        nn.init.xavier_uniform_(self.classifier.weight)
        self.seg = DenseBranch(dim, channels, num_classes, rates)
        self.sal = DenseBranch(dim, channels, 1, rates) if saliency_task else None
        self.cross = CrossTaskFusion(renormalize_cross) if saliency_task and cross_affinity else None
        self.cross_affinity = cross_affinity
        if self.freeze_bn:
            set_bn_eval(self.backbone)

    def new_parameters(self) -> list[nn.Parameter]:
        """Everything but the backbone (official: the seg*/sal*/fc8 layers at 10x the learning rate)."""
        own = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    def forward(self, x: torch.Tensor, with_affinity: bool = False) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> cls (N, K), cams (N, K, h, w), init_seg / seg (N, C, h, w), init_sal / sal
        (N, 1, h, w) logits at feature size, logits = seg upsampled to (H, W) [, affinity (N, hw, hw)]."""
        feats = self.backbone(x)[-1]
        out = {"cls": self.classifier(F.adaptive_avg_pool2d(self.dropout(feats), 1)).flatten(1),
               "cams": F.conv2d(feats, self.classifier.weight)}
        out["init_seg"], a_seg = self.seg(feats)
        affinity = a_seg
        if self.sal is not None:
            out["init_sal"], a_sal = self.sal(feats)
            if self.cross is not None:
                affinity = self.cross(a_seg, a_sal)
        if self.cross_affinity:
            out["seg"] = propagate(affinity, out["init_seg"])
            if "init_sal" in out:
                out["sal"] = propagate(affinity, out["init_sal"])
        else:
            out["seg"] = out["init_seg"]
            if "init_sal" in out:
                out["sal"] = out["init_sal"]
        out["logits"] = F.interpolate(out["seg"], size=x.shape[-2:], mode="bilinear", align_corners=False)
        if with_affinity:
            out["affinity"] = affinity if self.cross_affinity else None
        return out

    def train(self, mode: bool = True) -> "AuxSegNetwork":
        super().train(mode)
        if self.freeze_bn:
            set_bn_eval(self.backbone)
        return self
