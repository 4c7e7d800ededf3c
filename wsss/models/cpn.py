"""CPN's CAM network: SEAM's network (PCM) plus the Pixel-Region Correlation Module (PRCM).

Official `network/resnet38_CPN.py::Net` (ResNet-38). With d = the one-hot-ised, max-normalised CAM
(no gradient; `pcm_input`) and f = [image, proj(mid), proj(deep)] (3 + 64 + 128 channels):
  regions = softmax_hw(d) @ f^T                         (N, D, C)  class-region vectors (OCR's SpatialGather)
  keys    = relu(f10(regions))                          (N, E, C)  f10: 1x1 conv D -> E = 192
  sim     = softmax_hw(C^-1/2 * keys^T relu(f9(f)))     (N, C, h, w)  every class's map sums to 1 over pixels
  cam_rv  = PCM(d, f9(f)) + sim * d
`keys` goes from (N, E, C) to (N, C, E) in the code with `.view(n, 21, -1)`, a reshape, not a
transpose: each "class key" is then a mix of 192 values taken across classes. `prcm_keys="view"`
(the default) does what the code does, `"transpose"` what the paper describes (one key per class).
f9 (the PCM embedding) is shared by PCM and PRCM, as in the code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.seam import SeamCAMNet, _resize, pcm, pcm_input


def spatial_gather(features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """features (N, D, h, w), class maps (N, C, h, w) -> class-region vectors (N, D, C) (softmax over pixels)."""
    weights = F.softmax(probs.flatten(2), dim=2)  # (N, C, hw)
    return torch.bmm(weights, features.flatten(2).transpose(1, 2)).transpose(1, 2)


class PRCM(nn.Module):
    """Pixel-Region Correlation: (d (N, C, h, w), f (N, D, h, w), f9(f) (N, E, h, w)) -> sim (N, C, h, w)."""

    def __init__(self, in_channels: int, key_channels: int = 192, keys: str = "view"):
        super().__init__()
        if keys not in ("view", "transpose"):
            raise ValueError(f"keys must be 'view' (official code) or 'transpose' (paper), got {keys!r}")
        self.keys = keys
        self.key = nn.Conv2d(in_channels, key_channels, 1, bias=False)  # official f10
        nn.init.xavier_uniform_(self.key.weight, gain=4)

    def forward(self, cams: torch.Tensor, features: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        n, c, h, w = cams.shape
        regions = spatial_gather(features, cams)  # (N, D, C)
        keys = F.relu(self.key(regions.unsqueeze(-1))).squeeze(-1)  # (N, E, C)
        if self.keys == "view":
            keys = keys.reshape(n, c, -1)  # the code's .view(n, 21, -1): mixes channels and classes
        else:
            keys = keys.transpose(1, 2)  # (N, C, E): one key per class
        sim = torch.bmm(keys, F.relu(embedded).flatten(2)) * c ** -0.5  # (N, C, hw)
        return F.softmax(sim, dim=-1).view(n, c, h, w)


class CPNCAMNet(SeamCAMNet):
    """SEAM CAM network + PRCM; forward returns "cam" (raw) and "cam_rv" (PCM [+ PRCM] refined), (N, C, h, w)."""

    def __init__(self, backbone_cfg: Any, num_classes: int, prcm: bool = True, prcm_keys: str = "view",
                 dropout: float = 0.5):
        super().__init__(backbone_cfg, num_classes)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()  # official dropout7 before fc8
        self.prcm = PRCM(3 + 64 + 128, 192, prcm_keys) if prcm else None

    def new_parameters(self) -> list[nn.Parameter]:
        extra = list(self.prcm.parameters()) if self.prcm is not None else []
        return super().new_parameters() + extra

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images (N, 3, H, W) -> {"cam", "cam_rv"} (N, C, h, w) at feature size."""
        mid, deep, last = self.backbone(x)
        cam = self.classifier(self.dropout(last))
        size = cam.shape[-2:]
        feats = torch.cat([F.interpolate(x, size, mode="bilinear", align_corners=True),
                           F.relu(self.proj_mid(_resize(mid.detach(), size))),
                           F.relu(self.proj_deep(_resize(deep.detach(), size)))], 1)
        d = pcm_input(cam)
        embedded = self.embed(feats)
        cam_rv = pcm(d, embedded)
        if self.prcm is not None:
            cam_rv = cam_rv + self.prcm(d, feats, embedded) * d
        return {"cam": cam, "cam_rv": cam_rv}
