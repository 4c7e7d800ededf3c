"""Background-threshold pseudo masks (IRN/PSA seeds), with an optional confidence band and dense CRF."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from wsss.crf.presets import CRFParams
from wsss.io.images import IGNORE


def cam_labels(cams: np.ndarray, classes: np.ndarray, bg_threshold: float) -> np.ndarray:
    """(K, H, W) CAMs of the present classes -> (H, W) labels with a constant background score."""
    h, w = cams.shape[1:]
    if len(classes) == 0:
        return np.zeros((h, w), dtype=np.uint8)
    scores = np.concatenate([np.full((1, h, w), bg_threshold, dtype=np.float32), cams.astype(np.float32)], 0)
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    return keys[scores.argmax(0)]


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


def make_threshold_generator(bg_threshold: float, band: Sequence[float] = (), crf: Optional[CRFParams] = None,
                             crf_alpha: float = 4.0) -> Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray]:
    """(classes, cams, image) -> labels: background threshold, optional band, optional dense CRF (needs the image)."""
    band = list(band)
    if crf is None:
        return lambda classes, cams, image: threshold_mask(classes, cams, bg_threshold, band)

    from wsss.pseudo.refine import crf_labels

    def generate(classes: np.ndarray, cams: np.ndarray, image: Optional[np.ndarray]) -> np.ndarray:
        probs = cam_probabilities(classes, cams, crf_alpha)
        keys = np.concatenate([[0], classes]).astype(np.uint8)
        labels = keys[crf_labels(image, probs, crf)]
        if len(band) == 2 and len(classes):
            strongest = cams.max(0)
            labels[(strongest >= band[0]) & (strongest < band[1])] = IGNORE
        return labels

    return generate
