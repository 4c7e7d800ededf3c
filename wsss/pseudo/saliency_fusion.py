"""`pseudo.method: saliency_fusion`: Group-WSSS's `gen_labels.py` rule, CAMs + a saliency map -> pseudo masks.

1. scores: background 1 - saliency, class c the min-max normalised map of c;
2. saliency is raised to 255 where a class map exceeds `att_threshold`;
3. label = argmax of the scores;
4. pixels where more than one score exceeds `conflict` -> 255;
5. pixels labelled background whose (raised) saliency is >= `bg_saliency` -> 255;
6. if less than `min_fg_fraction` of the pixels is foreground, the whole image -> 255.
Thresholds are in the official units (saliency 0..255).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from wsss.errors import DataError
from wsss.pseudo import PseudoGenerator
from wsss.registry import PSEUDO_METHODS

__all__ = ["SaliencyFusionOptions", "saliency_fusion_labels"]

IGNORE = 255


@dataclass
class SaliencyFusionOptions:
    """`pseudo.saliency_fusion`: the official gen_labels.py thresholds."""

    conflict: float = 0.9  # more than one score above this -> ignore
    bg_saliency: float = 32.0  # background pixels with saliency (0..255) >= this -> ignore
    att_threshold: float = 0.8  # class map above this counts as salient
    min_fg_fraction: float = 0.01  # below this foreground fraction the whole image is ignored
    normalize: bool = True  # min-max normalise each class map (gen_labels.py does)


def saliency_fusion_labels(classes: np.ndarray, cams: np.ndarray, saliency: np.ndarray,
                           options: SaliencyFusionOptions = SaliencyFusionOptions()) -> np.ndarray:
    """classes (K,) label indices, cams (K, H, W) in [0, 1], saliency (H, W) in [0, 1] -> (H, W) uint8, 255 ignore."""
    o = options
    sal = np.asarray(saliency, np.float32) * 255.0
    h, w = sal.shape
    scores = [1.0 - sal / 255.0]
    sal_att = sal.copy()
    for cam in np.asarray(cams, np.float32).reshape(-1, h, w):
        att = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8) if o.normalize else cam
        scores.append(att)
        sal_att = np.maximum(sal_att, (att > o.att_threshold) * 255.0)
    stack = np.stack(scores)
    index = stack.argmax(0)
    labels = np.concatenate([[0], np.asarray(classes, np.int64)])[index].astype(np.uint8)
    labels[(stack > o.conflict).sum(0) > 1] = IGNORE
    labels[(sal_att >= o.bg_saliency) & (labels == 0)] = IGNORE
    if ((labels > 0) & (labels < IGNORE)).sum() < o.min_fg_fraction * h * w:
        labels[...] = IGNORE
    return labels


@PSEUDO_METHODS.register("saliency_fusion", options=SaliencyFusionOptions)
def saliency_fusion(settings: Any, options: Optional[SaliencyFusionOptions], bg_threshold: float) -> PseudoGenerator:
    """Group-WSSS's gen_labels.py: background from saliency, conflicts and uncertain background ignored."""
    o = options or SaliencyFusionOptions()

    def fn(classes: np.ndarray, cams: np.ndarray, image: Any, saliency: Optional[np.ndarray]) -> np.ndarray:
        if saliency is None:
            raise DataError(None, "pseudo.method=saliency_fusion needs saliency maps: set data.saliency_dir "
                                  "(e.g. the saliency stage's output) or use a data set that has them")
        return saliency_fusion_labels(classes, cams, saliency, o)

    return PseudoGenerator(fn, ("saliency",))
