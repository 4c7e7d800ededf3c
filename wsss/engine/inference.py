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
