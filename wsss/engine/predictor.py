"""A trained segmenter loaded from a run directory, for evaluation, prediction and cyclic masks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from wsss.crf.presets import CRFParams
from wsss.data.transforms import Normalizer
from wsss.engine.export import load_weights
from wsss.engine.inference import segment_probs
from wsss.models.backbones import normalization
from wsss.models.segmenter import Segmenter


class Predictor:
    """Wraps net + normaliser on a device; `labels()` gives (H, W) uint8 predictions."""

    def __init__(self, cfg: DictConfig, model_dir: Path, class_names: list[str], device: torch.device):
        self.net = Segmenter(cfg.seg, len(class_names))
        load_weights(self.net, model_dir, "seg", class_names)
        self.net = self.net.to(device).eval()
        if cfg.seg.encoder.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.norm = Normalizer(*normalization(cfg.seg.encoder)).to(device)
        self.class_names = class_names

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
