"""Proportional Pseudo-mask Generation (PPMG), PMM (ICCV 2021), as `pipline/refine_cam.py::ppmg` runs it.

For each present class k, with v_k its CAM and s_k the CoV-smoothed map (wsss/pseudo/cov.py; s_k = v_k
when `pseudo.cov.enabled` is false):
  1. a 2-label dense CRF on [(1 - s_k)^alpha, s_k] (unaries -log p, the `pmm_ppmg` CRF preset);
  2. foreground fg_k = [CRF probability of k > fg_threshold];
  3. importance P_k = v_k / (1 + sum over pixels of v_k * fg_k): the *unsmoothed* map, normalised by
     the class's own foreground mass, so a small object is not swallowed by a large one;
  4. background fg_0 = prod_k (1 - fg_k), P_0 = fg_0;
  5. label = argmax over {0} + classes of fg_i * P_i (ties go to the lowest index, i.e. background).
PPMG produces no ignore label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from wsss.config import CRFConfig
from wsss.crf.presets import CRFParams


@dataclass
class PPMGOptions:
    """`pseudo.ppmg`: PMM's --crf_threshs (alpha), the foreground threshold and its 2-label CRF."""

    alpha: float = 11.0
    fg_threshold: float = 0.5
    crf: CRFConfig = field(default_factory=lambda: CRFConfig(preset="pmm_ppmg"))


def class_foregrounds(image: np.ndarray, smoothed: np.ndarray, alpha: float, params: CRFParams,
                      fg_threshold: float = 0.5) -> np.ndarray:
    """Per-class 2-label dense CRF: image (H, W, 3) uint8, smoothed (K, H, W) in [0, 1] -> fg (K, H, W) bool."""
    from wsss.crf.dense_crf import DenseCRF, unary_from_probs

    fg = np.zeros(smoothed.shape, dtype=bool)
    if len(smoothed) == 0:
        return fg
    # The lattices depend only on the image: build them once and run one mean field per class.
    crf = DenseCRF(image, params)
    for k, s in enumerate(smoothed):
        s = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))
        probs = torch.stack([torch.pow(1.0 - s, alpha), s])
        q = crf.inference(unary_from_probs(probs))
        fg[k] = (q[1] > fg_threshold).cpu().numpy()
    return fg


def proportional_labels(cams: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
    """cams (K, H, W) unsmoothed, foregrounds (K, H, W) bool -> (H, W) int64 index into [background, class 1..K]."""
    fg = foregrounds.astype(np.float64)
    v = cams.astype(np.float64)
    importance = v / (1.0 + (v * fg).sum(axis=(1, 2), keepdims=True))  # +1 avoids 0/0 for an empty foreground
    background = np.prod(1.0 - fg, axis=0, keepdims=True)
    scores = np.concatenate([background, fg * importance], 0)
    return scores.argmax(0)


def ppmg_labels(image: np.ndarray, classes: np.ndarray, cams: np.ndarray, alpha: float, params: CRFParams,
                fg_threshold: float = 0.5, smoothed: Optional[np.ndarray] = None) -> np.ndarray:
    """PPMG pseudo mask: (H, W, 3) uint8 image, classes (K,), cams (K, H, W) -> (H, W) uint8 labels (0 = background)."""
    h, w = image.shape[:2]
    if len(classes) == 0:
        return np.zeros((h, w), np.uint8)
    fg = class_foregrounds(image, cams if smoothed is None else smoothed, alpha, params, fg_threshold)
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    return keys[proportional_labels(cams, fg)]


def make_ppmg_generator(alpha: float, fg_threshold: float, crf: CRFParams,
                        cov: Optional[tuple[float, float]] = None) -> Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray]:
    """(classes, cams, image) -> labels by PPMG; `cov` = (scale, threshold) smooths the maps its CRF sees."""
    from wsss.pseudo.cov import cov_smooth

    def generate(classes: np.ndarray, cams: np.ndarray, image: Optional[np.ndarray]) -> np.ndarray:
        if image is None:
            raise ValueError("PPMG needs the image (its dense CRF is image-dependent)")
        smoothed = cov_smooth(cams, *cov) if cov is not None else None
        return ppmg_labels(image, classes, cams, alpha, crf, fg_threshold, smoothed)

    return generate
