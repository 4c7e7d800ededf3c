"""Pseudo-mask generators by name: CAMs (+ image, + saliency) -> (H, W) uint8 label maps, 255 = ignore.

A generator is registered in `PSEUDO_METHODS` as a factory `(settings, options, bg_threshold) ->
PseudoGenerator`: `settings` is the plain `pseudo` section, `options` its own section
`pseudo.<name>` (a dataclass instance, or None), `bg_threshold` the background score to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from wsss.registry import PSEUDO_METHODS

__all__ = ["PSEUDO_METHODS", "PseudoGenerator", "build_generator"]


@dataclass(frozen=True)
class PseudoGenerator:
    """`fn(classes (K,), cams (K, H, W) in [0, 1], image (H, W, 3) | None, saliency (H, W) uint8 | None) -> labels`;
    `needs` says which of image / saliency the pseudo stage must load."""

    fn: Callable[[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]], np.ndarray]
    needs: tuple[str, ...] = ()

    def __call__(self, classes: np.ndarray, cams: np.ndarray, image: Optional[np.ndarray] = None,
                 saliency: Optional[np.ndarray] = None) -> np.ndarray:
        return self.fn(classes, cams, image, saliency)


def build_generator(method: str, settings: Any, options: Any = None, bg_threshold: Optional[float] = None) -> PseudoGenerator:
    """The generator registered as `method`, built from plain settings."""
    bg = settings.bg_threshold if bg_threshold is None else bg_threshold
    return PSEUDO_METHODS.get(method)(settings, options, bg)


def _crf_params(section: Any):
    from wsss.crf import presets

    return presets.resolve(**{k: getattr(section, k) for k in ("preset", *presets.FIELDS)})


@PSEUDO_METHODS.register("threshold")
def threshold(settings: Any, options: Any, bg_threshold: float) -> PseudoGenerator:
    """Background threshold (IRN/PSA seeds), optional confidence band, CoV smoothing and dense CRF."""
    from wsss.pseudo.threshold import make_threshold_generator

    crf = _crf_params(settings.crf_params) if settings.crf else None
    fn = make_threshold_generator(bg_threshold, list(settings.ignore_band), crf, settings.crf_alpha)
    if settings.cov.enabled:  # PMM's CoV smoothing on plain thresholding (an ablation row)
        from wsss.pseudo.cov import with_cov_smoothing

        fn = with_cov_smoothing(fn, settings.cov.scale, settings.cov.threshold)
    return PseudoGenerator(lambda classes, cams, image, saliency: fn(classes, cams, image),
                           ("image",) if crf is not None else ())


def _register_ppmg() -> None:
    from wsss.pseudo.ppmg import PPMGOptions

    @PSEUDO_METHODS.register("ppmg", options=PPMGOptions)
    def ppmg(settings: Any, options: Any, bg_threshold: float) -> PseudoGenerator:
        """PMM's Proportional Pseudo-mask Generation (CoV smoothing feeds its CRF when pseudo.cov.enabled)."""
        from wsss.pseudo.ppmg import make_ppmg_generator

        cov = settings.cov
        fn = make_ppmg_generator(options.alpha, options.fg_threshold, _crf_params(options.crf),
                                 (cov.scale, cov.threshold) if cov.enabled else None)
        return PseudoGenerator(lambda classes, cams, image, saliency: fn(classes, cams, image), ("image",))


_register_ppmg()
