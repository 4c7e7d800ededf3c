"""Agreement with pydensecrf2 (the reference) on the same parameters and the same unaries.

The unaries are synthetic but image-aligned: 21 labels from a softmax over 4 x (Gaussian-smoothed
one-hot ground truth) + 1.5 x (smooth random field, 16-px bilinear noise); 2 labels PPMG-style,
[(1 - v)^11, v], with v a smoothed ground-truth foreground plus smooth noise, clipped to [0, 1].
Both CRFs get exactly the same unary array, so the test checks the inference, not the unaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

dcrf = pytest.importorskip("pydensecrf.densecrf")
from pydensecrf.utils import unary_from_softmax  # noqa: E402
from scipy.ndimage import gaussian_filter, zoom  # noqa: E402

from wsss.crf import CRFParams, PRESETS, dense_crf  # noqa: E402

VOC = Path(__file__).parents[2] / "shared" / "data" / "voc12-mini" / "VOC2012"
needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason="needs ../shared/data/voc12-mini")


# The CRF and these losses are many small tensor ops: one thread is faster and steadier (conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_crf(img: np.ndarray, probs: np.ndarray, p: CRFParams) -> np.ndarray:
    """pydensecrf with the PSA/IRN call pattern: unary_from_softmax, Gaussian + bilateral Potts kernels."""
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    if p.gauss_compat:
        d.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
    if p.bilateral_compat:
        d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=np.ascontiguousarray(img),
                               compat=p.bilateral_compat)
    return np.array(d.inference(p.iterations), dtype=np.float32).reshape(c, h, w)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: int) -> np.ndarray:
    h, w = shape[-2:]
    coarse = rng.normal(size=shape[:-2] + ((h + cell - 1) // cell + 1, (w + cell - 1) // cell + 1))
    factor = (1,) * (len(shape) - 2) + (cell, cell)
    return zoom(coarse, factor, order=1)[..., :h, :w]


def probs_21(gt: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.where(gt == 255, 0, gt)
    onehot = np.stack([gaussian_filter((g == k).astype(np.float32), 8) for k in range(21)])
    logits = 4.0 * onehot + 1.5 * _smooth_noise(rng, onehot.shape, 16)
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def probs_ppmg(gt: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fg = ((gt > 0) & (gt < 255)).astype(np.float32)
    v = np.clip(0.9 * gaussian_filter(fg, 10) + 0.15 * _smooth_noise(rng, fg.shape, 32), 0, 1)
    return np.stack([(1 - v) ** 11, v]).astype(np.float32)


def load(i: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    ids = (VOC / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    img = Image.open(VOC / "JPEGImages" / f"{ids[i]}.jpg").convert("RGB")
    gt = Image.open(VOC / "SegmentationClass" / f"{ids[i]}.png")
    if scale != 1.0:
        size = (round(img.width * scale), round(img.height * scale))
        img, gt = img.resize(size, Image.BILINEAR), gt.resize(size, Image.NEAREST)
    return np.array(img), np.array(gt)


def agreement(img: np.ndarray, probs: np.ndarray, params: CRFParams) -> float:
    ref = reference_crf(img, probs, params)
    ours = dense_crf(img, torch.from_numpy(probs), params).numpy()
    return float((ref.argmax(0) == ours.argmax(0)).mean())


def test_kernel_message_matches_pydensecrf() -> None:
    # One iteration with two labels exposes the message: log(Q1/Q0) + (U1 - U0) = w K (Q0_1 - Q0_0).
    rng = np.random.default_rng(0)
    h, w = 40, 50
    img = np.clip(rng.normal(120, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img[:, 25:] //= 3
    probs = rng.uniform(0.2, 0.8, (1, h, w)).astype(np.float32)
    probs = np.concatenate([1 - probs, probs])
    for params in (CRFParams(1, 3, 0, 20, 13, 1.0), CRFParams(1, 3, 1.0, 20, 13, 0)):
        ref = reference_crf(img, probs, params)
        ours = dense_crf(img, torch.from_numpy(probs), params).numpy()
        u = -np.log(probs)
        msg_ref = np.log(ref[1] / ref[0]) + (u[1] - u[0])
        msg_ours = np.log(ours[1] / ours[0]) + (u[1] - u[0])
        assert np.abs(msg_ref).max() > 0.05  # the message is not trivially zero
        # float32 rounding only: both run the same lattice (same simplices, weights and order of blur)
        assert np.abs(msg_ref - msg_ours).max() < 2e-4


@needs_voc
@pytest.mark.voc
@pytest.mark.parametrize("i", [0, 1, 2])
def test_agreement_downscaled(i: int) -> None:
    img, gt = load(i, scale=0.5)
    a21 = agreement(img, probs_21(gt, i), PRESETS["irn"])
    a2 = agreement(img, probs_ppmg(gt, i), PRESETS["pmm_ppmg"])
    assert a21 >= 0.99 and a2 >= 0.99, (a21, a2)


@needs_voc
@pytest.mark.voc
def test_agreement_full_size() -> None:
    img, gt = load(3)
    assert img.shape[0] * img.shape[1] > 100_000
    a21 = agreement(img, probs_21(gt, 3), PRESETS["psa"])
    a2 = agreement(img, probs_ppmg(gt, 3), PRESETS["pmm_ppmg"])
    assert a21 >= 0.99 and a2 >= 0.99, (a21, a2)
