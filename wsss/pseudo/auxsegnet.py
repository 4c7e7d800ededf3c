"""AuxSegNet's pseudo labels: CAM + saliency fusion (official `tool/imutils.py::fusion_cam`) and the
two-label dense CRF that refines an updated saliency map (`crf_for_sal`).

Fusion rule, per pixel, with CAMs of the image's classes only:
    object by CAM      = max_c cam_c > cam_threshold   (official 0.2)
    object by saliency = saliency > sal_threshold      (official 0.06)
    both -> argmax_c cam_c (its class id); exactly one -> 255 (ignore); neither -> 0 (background).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from wsss.crf.presets import CRFParams
from wsss.io.images import IGNORE
from wsss.pseudo import PseudoGenerator
from wsss.registry import PSEUDO_METHODS


@dataclass
class AuxFusionOptions:
    """pseudo.auxsegnet: thresholds of the CAM + saliency fusion (also used by every auxseg_rounds update)."""

    cam_threshold: float = 0.2  # official fusion_cam: cam_max > 0.2
    sal_threshold: float = 0.06  # official fusion_cam: sal > 0.06 (saliency in [0, 1])


def as_unit(saliency: np.ndarray) -> np.ndarray:
    """Saliency (H, W) as float32 in [0, 1] (uint8 maps are divided by 255)."""
    sal = np.asarray(saliency)
    return sal.astype(np.float32) / 255.0 if sal.dtype == np.uint8 else sal.astype(np.float32)


def fuse_cam_saliency(classes: np.ndarray, cams: np.ndarray, saliency: np.ndarray, cam_threshold: float = 0.2,
                      sal_threshold: float = 0.06) -> np.ndarray:
    """(K,) class ids, (K, H, W) CAMs of those classes, (H, W) saliency in [0, 1] -> (H, W) uint8 labels."""
    sal_obj = as_unit(saliency) > sal_threshold
    if len(classes) == 0:  # no class: CAM evidence is empty, salient pixels disagree with it
        return np.where(sal_obj, IGNORE, 0).astype(np.uint8)
    cam_obj = cams.max(0) > cam_threshold
    keys = np.asarray(classes).astype(np.uint8)
    labels = np.zeros(cam_obj.shape, np.uint8)
    both = cam_obj & sal_obj
    labels[both] = keys[cams.argmax(0)][both]
    labels[cam_obj ^ sal_obj] = IGNORE
    return labels


def saliency_unaries(prob: np.ndarray, tau: float = 1.05, eps: float = 1e-8) -> np.ndarray:
    """crf_for_sal's energies (2, H, W): background -log(1 - p + eps) / (tau sigmoid(1 - p)),
    foreground -log(p + eps) / (tau sigmoid(p)), for a foreground probability p (H, W)."""
    p = prob.astype(np.float64)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    return np.stack([-np.log(1.0 - p + eps) / (tau * sig(1.0 - p)), -np.log(p + eps) / (tau * sig(p))]).astype(np.float32)


def saliency_crf(image: np.ndarray, prob: np.ndarray, params: CRFParams, tau: float = 1.05) -> np.ndarray:
    """Two-label dense CRF on a saliency map: image (H, W, 3) uint8, p (H, W) -> refined p (H, W) float32."""
    import torch

    from wsss.crf.dense_crf import dense_crf

    q = dense_crf(image, torch.from_numpy(saliency_unaries(prob, tau)), params, unary="energy")
    return q[1].cpu().numpy().astype(np.float32)


@PSEUDO_METHODS.register("auxsegnet", options=AuxFusionOptions)
def auxsegnet(settings: Any, options: Optional[AuxFusionOptions], bg_threshold: float) -> PseudoGenerator:
    """AuxSegNet's initial labels: CAMs fused with the data set's saliency maps (no background threshold)."""
    opts = options or AuxFusionOptions()

    def fn(classes: np.ndarray, cams: np.ndarray, image: Optional[np.ndarray], saliency: Optional[np.ndarray]) -> np.ndarray:
        if saliency is None:
            from wsss.errors import DataError

            raise DataError(None, "pseudo.method=auxsegnet needs saliency maps: set data.saliency_dir "
                                  "(or use a data set that has them)")
        return fuse_cam_saliency(classes, cams, saliency, opts.cam_threshold, opts.sal_threshold)

    return PseudoGenerator(fn, ("saliency",))
