"""Coefficient-of-Variation Smoothing (CVS) of CAMs, PMM (ICCV 2021), as the official code runs it.

PMM `pipline/refine_cam.py`: `get_CoV` gives one number per present class,

    cv_k = scale * std(v_k[v_k > t]) / mean(v_k[v_k > t] + 1e-8)      (0 if no pixel exceeds t)

and `ppmg` smooths the map with `(v_k * [v_k >= t]) ** (1 - cv_k)`: activations below t are zeroed,
the rest are raised towards 1 (the exponent is below 1), more so for classes whose activations
spread widely (a peaky CAM that covers only the discriminative part gets the largest expansion).
Note the strict `>` for the statistics and `>=` for the mask, as in the code. The official maps are
float16; we compute in float64/float32 (cv differs by about 3e-5, reference-methods.md §1.5).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def coefficient_of_variation(cams: np.ndarray, scale: float = 0.3, threshold: float = 0.05) -> np.ndarray:
    """(K, H, W) maps in [0, 1] -> (K,) cv_k = scale * std / mean of the activations above threshold (0 if none)."""
    cv = np.zeros(len(cams), dtype=np.float64)
    for k, v in enumerate(cams):
        active = v[v > threshold].astype(np.float64)
        if active.size:
            cv[k] = scale * active.std() / (active + 1e-8).mean()  # population std, as numpy's default
    return cv


def cov_smooth(cams: np.ndarray, scale: float = 0.3, threshold: float = 0.05,
               cv: Optional[np.ndarray] = None) -> np.ndarray:
    """(K, H, W) maps in [0, 1] -> smoothed (K, H, W) float32: (v * [v >= threshold]) ** (1 - cv_k)."""
    if cv is None:
        cv = coefficient_of_variation(cams, scale, threshold)
    kept = np.where(cams >= threshold, cams, 0.0).astype(np.float32)
    return np.power(kept, (1.0 - cv).astype(np.float32)[:, None, None])


def with_cov_smoothing(generator: Callable, scale: float = 0.3, threshold: float = 0.05) -> Callable:
    """Wrap a pseudo-mask generator so it sees CoV-smoothed CAMs (for methods that take only one map)."""

    def generate(classes: np.ndarray, cams: np.ndarray, image: Optional[np.ndarray]) -> np.ndarray:
        return generator(classes, cov_smooth(cams, scale, threshold), image)

    return generate
