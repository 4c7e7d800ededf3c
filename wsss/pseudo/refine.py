"""Dense-CRF refinement of soft label maps (numpy in, numpy out) on top of wsss.crf."""

from __future__ import annotations

import numpy as np
import torch

from wsss.crf.presets import CRFParams


def crf_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """Mean-field refined probabilities (C, H, W) float32 from an (H, W, 3) uint8 image and (C, H, W) probabilities."""
    from wsss.crf.dense_crf import dense_crf

    out = dense_crf(image, torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)), params)
    return out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def crf_labels(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """Argmax (H, W) of the CRF-refined probabilities (indices into the rows of `probs`)."""
    return crf_probs(image, probs, params).argmax(0).astype(np.int64)
