"""Dense-CRF parameter sets used by the reference implementations (docs/methods/crf.md has sources)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from wsss.registry import CRF_PRESETS


@dataclass(frozen=True)
class CRFParams:
    """Potts dense CRF: Gaussian (xy) and bilateral (xy + rgb) kernels, mean-field iterations."""

    iterations: int
    gauss_sxy: float
    gauss_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float


PRESETS = CRF_PRESETS  # name -> CRFParams (None: every parameter set explicitly, preset "custom")

for _name, _params in {
    # PSA / AffinityNet tool/imutils.crf_inference (also PMM tool/imutils.crf_inference, stage-2 masks)
    "psa": CRFParams(10, 3, 3, 80, 13, 10),
    # IRN misc/imutils.crf_inference_label
    "irn": CRFParams(10, 3, 3, 50, 5, 10),
    # PMM pipeline/refine_cam.crf_inference: the 2-label CRF inside PPMG (Gaussian compat 10)
    "pmm_ppmg": CRFParams(10, 3, 10, 80, 13, 10),
    # PMM stage-2 rough masks (tool/imutils.crf_inference): same as PSA
    "pmm_seed": CRFParams(10, 3, 3, 80, 13, 10),
    # PMM WSSS_MMSeg EncoderDecoder.DenseCRF: cyclic pseudo-masks and test-time CRF
    "pmm_cyclic": CRFParams(10, 1, 3, 67, 3, 4),
    # AuxSegNet infer_AuxAff crf_inference_inf (test-time post-processing)
    "auxsegnet": CRFParams(10, 4, 3, 83, 5, 3),
    # AuxSegNet crf_for_sal (saliency pseudo-label update; one iteration)
    "auxsegnet_sal": CRFParams(1, 3, 3, 60, 5, 5),
    # every parameter set explicitly in the config
    "custom": None,
}.items():
    CRF_PRESETS.add(_name, _params)

FIELDS = ("iterations", "gauss_sxy", "gauss_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")


def resolve(preset: str, **overrides: float) -> CRFParams:
    """A preset's parameters with some replaced (values < 0 keep the preset's; 'custom' needs all six)."""
    from wsss.errors import ConfigError

    base = CRF_PRESETS.get(preset)
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise ConfigError(f"crf parameters: unknown {', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}")
    changes = {f: (int(v) if f == "iterations" else float(v)) for f, v in overrides.items() if v >= 0}
    if base is None:
        missing = [f for f in FIELDS if f not in changes]
        if missing:
            raise ConfigError(f"crf preset 'custom' needs {', '.join(missing)} to be set")
        return CRFParams(**changes)
    return replace(base, **changes)
