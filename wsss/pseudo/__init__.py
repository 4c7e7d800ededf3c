"""Pseudo-mask generators: CAMs (+ image) -> (H, W) uint8 label maps, 255 = ignore."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

# A generator maps (classes (K,), cams (K, H, W) in [0, 1], image (H, W, 3) uint8 or None) -> labels.
Generator = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray]


def build_generator(pseudo_cfg: Any, bg_threshold: float | None = None) -> tuple[Generator, bool]:
    """The generator named by `pseudo.method` and whether it needs the image."""
    bg = pseudo_cfg.bg_threshold if bg_threshold is None else bg_threshold
    if pseudo_cfg.method == "threshold":
        from wsss.pseudo.threshold import make_threshold_generator

        generator = make_threshold_generator(pseudo_cfg, bg)
        if pseudo_cfg.cov.enabled:  # PMM's CoV smoothing on plain thresholding (an ablation row)
            from wsss.cam.cov import with_cov_smoothing

            generator = with_cov_smoothing(generator, pseudo_cfg.cov)
        return generator, bool(pseudo_cfg.crf)
    if pseudo_cfg.method == "ppmg":
        # PPMG applies pseudo.cov itself: its CRF sees the smoothed maps, its proportions the raw ones.
        from wsss.pseudo.ppmg import make_ppmg_generator

        return make_ppmg_generator(pseudo_cfg), True
    raise ValueError(f"unknown pseudo-mask method {pseudo_cfg.method!r}")
