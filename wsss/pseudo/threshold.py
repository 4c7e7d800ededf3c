"""Background-threshold pseudo masks (IRN/PSA seeds), with an optional confidence band and dense CRF."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from wsss.metrics import cam_labels

IGNORE = 255


def threshold_mask(classes: np.ndarray, cams: np.ndarray, bg_threshold: float, ignore_band: Sequence[float] = ()) -> np.ndarray:
    """(K, H, W) CAMs -> (H, W) labels: argmax over [bg_threshold, CAMs].

    With ignore_band = [low, high], pixels whose strongest CAM lies in [low, high) become 255
    (uncertain), pixels below `low` background, pixels at or above `high` their argmax class (IRN's
    conf_bg/conf_fg thresholds); bg_threshold is then not used.
    """
    if len(ignore_band) == 2:
        low, high = ignore_band
        labels = cam_labels(cams, classes, high)
        if len(classes):
            strongest = cams.max(0)
            labels[(strongest >= low) & (strongest < high)] = IGNORE
        return labels
    return cam_labels(cams, classes, bg_threshold)


def cam_probabilities(classes: np.ndarray, cams: np.ndarray, alpha: float) -> np.ndarray:
    """(K, H, W) CAMs -> (K+1, H, W) class scores with background (1 - max CAM)^alpha (PSA), normalised."""
    h, w = cams.shape[1:]
    if len(classes) == 0:
        return np.ones((1, h, w), np.float32)
    bg = np.power(1.0 - cams.max(0, keepdims=True), alpha)
    scores = np.concatenate([bg, cams], 0).astype(np.float32)
    return scores / (scores.sum(0, keepdims=True) + 1e-5)


def make_threshold_generator(pseudo_cfg: Any, bg_threshold: float):
    """Generator for `pseudo.method: threshold`."""
    band = list(pseudo_cfg.ignore_band)
    if not pseudo_cfg.crf:
        return lambda classes, cams, image: threshold_mask(classes, cams, bg_threshold, band)

    from wsss.crf import presets
    from wsss.pseudo.refine import crf_labels

    params = presets.resolve(pseudo_cfg.crf_params)

    def generate(classes: np.ndarray, cams: np.ndarray, image: Optional[np.ndarray]) -> np.ndarray:
        probs = cam_probabilities(classes, cams, pseudo_cfg.crf_alpha)
        keys = np.concatenate([[0], classes]).astype(np.uint8)
        labels = keys[crf_labels(image, probs, params)]
        if len(band) == 2 and len(classes):
            strongest = cams.max(0)
            labels[(strongest >= band[0]) & (strongest < band[1])] = IGNORE
        return labels

    return generate
