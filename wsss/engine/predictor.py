"""A trained segmentation method on a device, for evaluation, prediction and cyclic masks."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from wsss.crf.presets import CRFParams
from wsss.engine.inference import segment_probs


class Predictor:
    """Wraps a segmentation method (net + normaliser) in eval mode; `labels()` gives (H, W) uint8 predictions."""

    def __init__(self, method: torch.nn.Module, device: torch.device):
        self.method = method.to(device).eval()
        self.net, self.norm = self.method.net, self.method.norm

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> logits (N, C, H, W)."""
        return self.method.logits(x)

    def probs(self, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
        """(H, W, 3) uint8 -> (C, H, W) softmax probabilities."""
        return segment_probs(self, image, scales, flip)

    def labels(self, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = False,
               crf: Optional[CRFParams] = None) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) uint8 class indices (optionally dense-CRF refined)."""
        probs = self.probs(image, scales, flip)
        if crf is not None:
            from wsss.pseudo.refine import crf_probs

            return crf_probs(image, probs.float().cpu().numpy(), crf).argmax(0).astype(np.uint8)
        return probs.argmax(0).to(torch.uint8).cpu().numpy()
