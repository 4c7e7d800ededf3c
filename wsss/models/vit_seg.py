"""A plain (non-hierarchical) timm ViT with a small progressive-upsampling decoder (`seg.arch: vitseg`).

smp 0.6 has DPT for timm ViTs, but its decoder fuses at 256+ channels up to stride 2, which is
several times the cost of the backbone on a CPU at 320 px. This decoder is the light variant of the
same idea (SETR-MLA / DPT): tokens of four evenly spaced blocks, each projected to `channels`,
concatenated and fused at the patch stride, then upsampled x2 with a 3x3 conv until stride 4.

The model exposes the attributes `Segmenter` uses for smp models: `encoder` (with `.model`, the timm
network, and `.out_channels`), `decoder(features) -> (N, channels, H/4, W/4)` and
`segmentation_head(decoded) -> logits`, so training, inference and export treat it like any other arch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ViTEncoder(nn.Module):
    """timm ViT returning the tokens of `num_levels` evenly spaced blocks as maps (N, D, H/p, W/p)."""

    def __init__(self, name: str, pretrained: bool, num_levels: int = 4, **timm_kwargs: Any):
        super().__init__()
        try:
            # dynamic_img_size: any input size (crops, whole images); the position embedding is resampled.
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **timm_kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(f"seg.encoder.name: {name!r} is not a timm model") from None
            raise
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "blocks"):
            raise ConfigError(f"seg.arch=vitseg needs a plain timm ViT (with blocks and forward_intermediates), got {name!r}")
        depth = len(self.model.blocks)
        n = min(num_levels, depth)
        self.indices = [round((i + 1) * depth / n) - 1 for i in range(n)]  # e.g. 12 blocks -> 2, 5, 8, 11
        self.patch = int(self.model.patch_embed.patch_size[0])
        self.out_channels = [int(self.model.embed_dim)] * n

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> list of (N, D, ceil(H/p), ceil(W/p)), shallow to deep."""
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            # The patch embedding needs multiples of the patch size. Resizing (not padding) keeps the
            # token grid aligned with the whole image, so the logits can simply be resized back.
            size = (math.ceil(h / self.patch) * self.patch, math.ceil(w / self.patch) * self.patch)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True, output_fmt="NCHW")

    def freeze(self, num_blocks: int) -> None:
        """Freeze the patch embedding, position embedding, prefix tokens and the first `num_blocks` blocks."""
        if num_blocks <= 0:
            return
        m = self.model
        frozen = [m.patch_embed, *m.blocks[:num_blocks]]
        for mod in frozen:
            for p in mod.parameters():
                p.requires_grad_(False)
        for name in ("pos_embed", "cls_token", "reg_token"):
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)


class ViTDecoder(nn.Module):
    """Multi-level fusion at the patch stride, then x2 upsampling + 3x3 conv until stride 4."""

    def __init__(self, in_channels: Sequence[int], patch: int, channels: int = 128):
        super().__init__()
        self.proj = nn.ModuleList([_conv_bn_relu(c, channels, 1) for c in in_channels])
        self.fuse = _conv_bn_relu(channels * len(in_channels), channels, 3)
        ups = max(0, int(round(math.log2(max(patch, 4) / 4))))  # patch 16 -> 2 steps (stride 16 -> 4)
        self.up = nn.ModuleList([_conv_bn_relu(channels, channels, 3) for _ in range(ups)])
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """list of (N, D_l, H/p, W/p) -> decoder features (N, channels, H/4, W/4)."""
        x = self.fuse(torch.cat([p(f) for p, f in zip(self.proj, features)], 1))
        for conv in self.up:
            x = conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return x


class ViTSegModel(nn.Module):
    """encoder + decoder + 1x1 segmentation head, with smp's attribute names."""

    def __init__(self, encoder_name: str, pretrained: bool, num_classes: int, decoder_channels: int = 128,
                 num_levels: int = 4, **timm_kwargs: Any):
        super().__init__()
        self.encoder = ViTEncoder(encoder_name, pretrained, num_levels, **timm_kwargs)
        self.decoder = ViTDecoder(self.encoder.out_channels, self.encoder.patch, decoder_channels)
        self.segmentation_head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(decoder_channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, C, H/4, W/4) (Segmenter resizes them to the input)."""
        return self.segmentation_head(self.decoder(self.encoder(x)))


def build_vit_seg(encoder: Any, num_classes: int, arch_kwargs: dict[str, Any]) -> ViTSegModel:
    """The `vitseg` model for a SegConfig; arch_kwargs: decoder_channels, num_levels, and timm kwargs (e.g. patch_size)."""
    kwargs = dict(arch_kwargs)
    model = ViTSegModel(encoder.name, encoder.weights == "imagenet", num_classes,
                        decoder_channels=int(kwargs.pop("decoder_channels", 128)),
                        num_levels=int(kwargs.pop("num_levels", 4)), **kwargs)
    model.encoder.freeze(encoder.frozen_stages)
    return model
