"""Segmenter inference on whole images: padding, multi-scale + flip averaging (the dense CRF is wsss/engine/predictor.py)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PAD_MULTIPLE = 32  # smp encoders need sizes divisible by their total stride


def _pad(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)


@torch.inference_mode()
def segment_probs(module: Any, image: np.ndarray | torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Softmax probabilities (C, H, W) of one (H, W, 3) uint8 image, averaged over scales and flips.

    `module` has `.net`, `.norm` (Normalizer) and `.logits(x)` (a segmentation method or a Predictor).
    Inputs are zero-padded to a multiple of the method's `pad_multiple` (default PAD_MULTIPLE).
    """
    multiple = getattr(getattr(module, "method", module), "pad_multiple", PAD_MULTIPLE)
    device = next(module.net.parameters()).device
    img = torch.tensor(np.asarray(image), device=device).permute(2, 0, 1)[None].float()
    x0 = module.norm(img)
    h, w = x0.shape[-2:]
    total = None
    for s in scales:
        x = x0 if s == 1.0 else F.interpolate(x0, size=(max(8, round(h * s)), max(8, round(w * s))), mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        xp, (hh, ww) = _pad(x, multiple)
        if getattr(module.net, "channels_last", False) or next(module.net.parameters()).is_contiguous(memory_format=torch.channels_last):
            xp = xp.contiguous(memory_format=torch.channels_last)
        logits = module.logits(xp)[..., :hh, :ww]
        if flip:
            logits = torch.cat([logits[:1], logits[1:].flip(-1)], 0)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(1).sum(0)
        total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


class EncoderMemo:
    """`segment_probs`' view of a segmentation method whose encoder is frozen: each image's encoder
    features are computed once and reused (validation sees the same images at every epoch).

    Only the levels the decoder reads are kept (`levels`), on the CPU, up to `budget_bytes`; images past the
    budget are encoded each time. Set `key` (the image's id) before each `segment_probs(memo, image)` call
    at a single scale without flip; the features depend on nothing else while the encoder is frozen.
    """

    def __init__(self, method: Any, encoder: torch.nn.Module, levels: Sequence[int], budget_bytes: int):
        self.method, self.net, self.norm = method, method.net, method.norm
        self.encoder, self.levels, self.budget = encoder, set(levels), budget_bytes
        self.store: dict[str, list[torch.Tensor]] = {}
        self.bytes = 0
        self.key = ""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Padded normalised image (1, 3, H, W) -> logits (1, C, H, W), the encoder skipped when `key` is stored."""
        if self.key in self.store:
            features = [f.to(x.device) for f in self.store[self.key]]
        else:
            features = self.encoder(x)
            kept = [f.cpu() if i in self.levels else f.new_empty(0, device="cpu") for i, f in enumerate(features)]
            size = sum(f.numel() * f.element_size() for f in kept)
            if self.key and self.bytes + size <= self.budget:
                self.store[self.key], self.bytes = kept, self.bytes + size
        return self.method.decode_cached(x, features)["logits"]
