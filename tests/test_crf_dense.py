"""Dense CRF mean field: API, shapes, unaries, batching, no pydensecrf needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from wsss.crf import CRFParams, DenseCRF, dense_crf, dense_crf_batch, unary_from_labels, unary_from_probs
from wsss.crf.presets import PRESETS


# The CRF and these losses are many small tensor ops: one thread is faster and steadier (conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scene(h: int = 30, w: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-region image (uint8 HWC) and noisy 3-label probabilities (C, H, W) that disagree with it a bit."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 40, 40)
    img[:, w // 2 :] = (30, 60, 210)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    logits = np.zeros((3, h, w), np.float32)
    logits[0, :, : w // 2] = 1.0
    logits[1, :, w // 2 :] = 1.0
    logits += rng.normal(0, 1.0, logits.shape).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(0)
    return img, p.astype(np.float32)


def test_output_is_a_distribution_and_cleans_noise() -> None:
    img, p = _scene()
    q = dense_crf(img, torch.from_numpy(p), PRESETS["psa"])
    assert q.shape == p.shape and q.dtype == torch.float32
    assert torch.allclose(q.sum(0), torch.ones(p.shape[1:]), atol=1e-5)
    truth = np.zeros(p.shape[1:], np.int64)
    truth[:, p.shape[2] // 2 :] = 1
    before = (p.argmax(0) == truth).mean()
    after = (q.argmax(0).numpy() == truth).mean()
    assert after > before and after > 0.95


def test_zero_iterations_is_softmax_of_unary() -> None:
    img, p = _scene()
    q = dense_crf(img, torch.from_numpy(p), PRESETS["irn"], iterations=0)
    u = unary_from_probs(p)
    assert torch.allclose(q, torch.softmax(-u, 0), atol=1e-6)


def test_unary_modes_agree() -> None:
    img, p = _scene()
    params = PRESETS["auxsegnet"]
    logits = torch.log(torch.from_numpy(p))
    a = dense_crf(img, torch.from_numpy(p), params, clip=1e-30)
    b = dense_crf(img, logits, params, unary="logits")
    c = dense_crf(img, -logits, params, unary="energy")
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(b, c, atol=1e-6)


def test_two_label_path_matches_general_path() -> None:
    img, p = _scene()
    p2 = np.stack([p[0] + p[2], p[1]])
    crf = DenseCRF(img, PRESETS["pmm_ppmg"])
    u = unary_from_probs(p2)
    fast = crf.inference(u)
    general = crf._inference_multi(u[None], PRESETS["pmm_ppmg"].iterations)[0]
    assert torch.allclose(fast, general, atol=1e-4)


def test_batch_equals_single_images() -> None:
    scenes = [_scene(seed=s) for s in range(2)]
    imgs = np.stack([s[0] for s in scenes])
    probs = torch.from_numpy(np.stack([s[1] for s in scenes]))
    params = PRESETS["pmm_cyclic"]
    batch = dense_crf_batch(imgs, probs, params)
    for i in range(2):
        assert torch.allclose(batch[i], dense_crf(imgs[i], probs[i], params), atol=1e-5)


def test_unary_helpers_match_pydensecrf_formulas() -> None:
    p = np.random.default_rng(0).dirichlet(np.ones(4), size=(5, 6)).transpose(2, 0, 1).astype(np.float32)
    p[0, 0, 0] = 0.0
    want = -np.log(np.clip(p, 1e-5, 1.0))
    assert np.allclose(unary_from_probs(p).numpy(), want, atol=1e-6)
    labels = np.array([[0, 1, 2], [3, 0, 1]])

    def reference(lab: np.ndarray, n: int, gt: float, zero_unsure: bool) -> np.ndarray:
        # pydensecrf.utils.unary_from_labels, written out
        flat = lab.flatten()
        u = np.full((n, flat.size), -np.log((1.0 - gt) / (n - 1)), np.float32)
        u[flat - 1 if zero_unsure else flat, np.arange(flat.size)] = -np.log(gt)
        if zero_unsure:
            u[:, flat == 0] = -np.log(1.0 / n)
        return u.reshape((n,) + lab.shape)

    for n, zero_unsure in ((3, True), (4, False)):
        got = unary_from_labels(labels, n, 0.7, zero_unsure=zero_unsure).numpy()
        assert np.allclose(got, reference(labels, n, 0.7, zero_unsure), atol=1e-6)


def test_device_follows_probs_and_accepts_tensors() -> None:
    img, p = _scene()
    q = dense_crf(torch.from_numpy(img), torch.from_numpy(p), PRESETS["irn"])
    assert q.device == torch.device("cpu")


def test_custom_params_without_kernels() -> None:
    img, p = _scene()
    params = CRFParams(5, 3, 0, 50, 5, 0)
    q = dense_crf(img, torch.from_numpy(p), params)
    assert torch.allclose(q, torch.softmax(-unary_from_probs(p), 0), atol=1e-6)


def test_importable_without_pydensecrf() -> None:
    code = (
        "import sys; sys.modules['pydensecrf'] = None; sys.modules['pydensecrf.densecrf'] = None\n"
        "import numpy as np, torch\n"
        "from wsss.crf import dense_crf, PRESETS\n"
        "q = dense_crf(np.zeros((8, 9, 3), np.uint8), torch.full((2, 8, 9), 0.5), PRESETS['irn'])\n"
        "assert q.shape == (2, 8, 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_inputs_raise() -> None:
    img, p = _scene()
    with pytest.raises(ValueError):
        dense_crf(img, torch.from_numpy(p)[None], PRESETS["irn"])
    with pytest.raises(ValueError):
        dense_crf(img, torch.from_numpy(p), PRESETS["irn"], unary="nope")
    with pytest.raises(ValueError):
        dense_crf(img[:, :-1], torch.from_numpy(p), PRESETS["irn"])
