"""Scribble losses on tiny cases: pCE, the DenseCRF loss (vs the exact dense kernel, ROI, gradients),
the DFR kernel (gradcheck in float64), the consistency head's loss and the ViT segmenter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from wsss.config import SegConfig
from wsss.crf.exact import gaussian_kernel_matrix
from wsss.crf.filters import bilateral_features
from wsss.losses.ce import partial_cross_entropy
from wsss.losses.densecrf_loss import dense_bilateral_filter, densecrf_loss, downscale
from wsss.losses.dfr import (DFRLoss, consistency_loss, grid_shape, joint_kernel, potts_term, scribble_cell_labels)
from wsss.losses.regularized import RegularizerContext, build_regularizer, decoder_channels


# The CRF and these losses are many small tensor ops: one thread is faster and steadier (conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(b: int = 2, h: int = 12, w: int = 14, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant colours plus noise, (B, 3, H, W) in 0..255."""
    g = torch.Generator().manual_seed(seed)
    img = torch.empty(b, 3, h, w)
    img[..., : w // 2] = torch.tensor([200.0, 40.0, 40.0])[:, None, None]
    img[..., w // 2:] = torch.tensor([30.0, 60.0, 220.0])[:, None, None]
    return (img + 8 * torch.randn(img.shape, generator=g)).clamp(0, 255)


def _probs(b: int = 2, c: int = 3, h: int = 12, w: int = 14, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=dtype).softmax(1)


def _brute_force_loss(probs: torch.Tensor, image: torch.Tensor, roi: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """-(1/N) sum_n sum_k S_k^T W S_k with W materialised from its definition (no shared code path)."""
    total = probs.new_zeros(())
    for n in range(probs.shape[0]):
        f, _ = bilateral_features(image[n:n + 1].to(probs.dtype), sxy, srgb)
        wmat = gaussian_kernel_matrix(f)
        s = (probs[n] * roi[n]).flatten(1)  # (C, HW)
        total = total - torch.einsum("ci,ij,cj->", s, wmat, s)
    return total / probs.shape[0]


def test_pce_ignores_unlabelled_pixels() -> None:
    logits = torch.randn(2, 3, 5, 5)
    target = torch.full((2, 5, 5), 255)
    target[0, 1, 1], target[1, 3, 2] = 2, 0
    expected = (F.cross_entropy(logits[0, :, 1, 1][None], torch.tensor([2])) +
                F.cross_entropy(logits[1, :, 3, 2][None], torch.tensor([0]))) / 2
    assert torch.allclose(partial_cross_entropy(logits, target), expected)
    empty = partial_cross_entropy(logits.requires_grad_(), torch.full((2, 5, 5), 255))
    assert float(empty.detach()) == 0.0 and empty.requires_grad  # keeps the graph (DDP)


def test_densecrf_exact_kernel_matches_definition_and_gradient() -> None:
    image, roi = _image(), torch.ones(2, 12, 14, dtype=torch.bool)
    roi[1, :, -3:] = False
    probs = _probs(dtype=torch.float64).requires_grad_()
    ours = densecrf_loss(probs, image.double(), roi, sigma_rgb=15.0, sigma_xy=5.0, kernel="exact")
    ref = _brute_force_loss(probs, image.double(), roi[:, None].double(), 5.0, 15.0)
    assert torch.allclose(ours, ref, rtol=1e-10)
    # The analytic gradient of -S^T W S is -2 W S / N (W symmetric), masked by the ROI.
    (g,) = torch.autograd.grad(ours, probs)
    s = probs.detach() * roi[:, None]
    expected = -2.0 * dense_bilateral_filter(image.double(), s, 5.0, 15.0) / 2 * roi[:, None]
    assert torch.allclose(g, expected, rtol=1e-9, atol=1e-12)
    small = probs.detach()[:, :, :6, :6].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: densecrf_loss(p, image[..., :6, :6].double(), roi[..., :6, :6], 15.0, 5.0, kernel="exact"), (small,))


def test_densecrf_lattice_against_exact_kernel() -> None:
    # The raw lattice is densecrf's/rloss's: about half the exact Gaussian sum (alpha and the lattice's
    # spread); its loss and gradient are otherwise proportional to the exact ones.
    image, roi = _image(2, 24, 28), torch.ones(2, 24, 28, dtype=torch.bool)
    probs = _probs(2, 3, 24, 28).requires_grad_()
    lat = densecrf_loss(probs, image, roi, 15.0, 6.0)
    (g_lat,) = torch.autograd.grad(lat, probs)
    probs_d = probs.detach().double().requires_grad_()
    exact = densecrf_loss(probs_d, image.double(), roi, 15.0, 6.0, kernel="exact")
    (g_exact,) = torch.autograd.grad(exact, probs_d)
    ratio = float(lat.detach()) / float(exact.detach())
    assert 0.4 < ratio < 0.75, ratio
    cos = F.cosine_similarity(g_lat.flatten().double(), g_exact.flatten(), dim=0)
    assert cos > 0.99, float(cos)


def test_densecrf_lattice_gradient_is_rloss_form() -> None:
    # Our backward is rloss's -2 L S / N (one filter pass), which equals autograd's -(L + L^T) S / N
    # up to the lattice's small asymmetry.
    from wsss.crf.filters import bilateral_filter

    image, roi = _image(), torch.ones(2, 12, 14, dtype=torch.bool)
    roi[0, -4:] = False
    probs = _probs().requires_grad_()
    (g,) = torch.autograd.grad(densecrf_loss(probs, image, roi, 15.0, 5.0), probs)
    s = probs.detach() * roi[:, None]
    expected = -2.0 * bilateral_filter(image, s, 5.0, 15.0) / 2 * roi[:, None]
    assert torch.allclose(g, expected, atol=1e-6)
    probs2 = probs.detach().clone().requires_grad_()
    auto = -(probs2 * roi[:, None] * bilateral_filter(image, probs2 * roi[:, None], 5.0, 15.0)).sum() / 2
    (g_auto,) = torch.autograd.grad(auto, probs2)
    assert F.cosine_similarity(g.flatten(), g_auto.flatten(), dim=0) > 0.999


def test_densecrf_roi_masks_padding() -> None:
    # Padding (roi False) contributes nothing, whatever the prediction or the image there.
    image, probs = _image(1, 16, 16), _probs(1, 3, 16, 16)
    roi = torch.ones(1, 16, 16, dtype=torch.bool)
    roi[:, :, 10:] = False
    base = densecrf_loss(probs, image, roi, 15.0, 5.0, kernel="exact")
    image2, probs2 = image.clone(), probs.clone()
    image2[..., 10:] = 0.0
    probs2[..., 10:] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    assert torch.allclose(base, densecrf_loss(probs2, image2, roi, 15.0, 5.0, kernel="exact"))
    cropped = densecrf_loss(probs[..., :10], image[..., :10], roi[..., :10], 15.0, 5.0, kernel="exact")
    assert torch.allclose(base, cropped)
    p = probs.clone().requires_grad_()
    (g,) = torch.autograd.grad(densecrf_loss(p, image, roi, 15.0, 5.0), p)
    assert g[..., 10:].abs().max() == 0 and g[..., :10].abs().max() > 0


def test_densecrf_downscaling_follows_rloss() -> None:
    image, probs = _image(1, 16, 20), _probs(1, 3, 16, 20)
    roi = torch.ones(1, 16, 20, dtype=torch.bool)
    p_s, i_s, r_s = downscale(probs, image, roi, 0.5)
    assert p_s.shape[-2:] == (8, 10) and i_s.shape[-2:] == (8, 10) and r_s.shape == (1, 8, 10)
    assert torch.equal(i_s, image[..., ::2, ::2])  # nearest, as rloss's F.interpolate default
    # sigma_xy is given in full-resolution pixels and scaled with the image
    direct = densecrf_loss(p_s, i_s, r_s, 15.0, 4.0, kernel="exact")
    assert torch.allclose(densecrf_loss(probs, image, roi, 15.0, 8.0, scale=0.5, kernel="exact"), direct)


def test_dfr_kernel_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    b, p = 2, 7
    xy = torch.rand(p, 2, generator=g, dtype=torch.float64) * 20
    rgb = (torch.rand(b, p, 3, generator=g, dtype=torch.float64) * 255).requires_grad_()
    emb = F.normalize(torch.randn(b, p, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    valid = torch.ones(b, p, dtype=torch.bool)
    valid[1, -2:] = False
    fn = lambda r, e: joint_kernel(xy, r, e, 10.0, 30.0, 0.5, valid)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (rgb, emb))
    probs = torch.randn(b, p, 3, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    kernel = fn(rgb, emb).detach()
    assert torch.autograd.gradcheck(lambda q: potts_term(q, kernel), (probs,))
    labels = torch.tensor([[0, 0, 1, 1, -1, 2, 2], [1, -1, 1, 0, 0, -1, -1]])
    assert torch.autograd.gradcheck(lambda e: consistency_loss(e, labels, 0.5)[0], (emb,))


def test_dfr_kernel_values() -> None:
    xy = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    rgb = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [30.0, 0.0, 0.0]]])
    emb = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    w = joint_kernel(xy, rgb, emb, 5.0, 30.0, 0.5)
    assert torch.allclose(w.diagonal(dim1=1, dim2=2), torch.zeros(1, 3))  # no self pairs
    assert torch.allclose(w[0, 0, 1], torch.exp(torch.tensor(-0.5 * 25 / 25)))  # xy only: |dp| = 5 = sigma
    # 0 vs 2: same place, colour 1 sigma apart, embeddings orthogonal (|de|^2 = 2, sigma 0.5 -> exp(-4))
    assert torch.allclose(w[0, 0, 2], torch.exp(torch.tensor(-0.5 - 4.0)))
    assert torch.allclose(w, w.transpose(1, 2))
    # Potts term: 0 when all cells agree, the kernel-weighted disagreement otherwise
    same = torch.tensor([[[1.0, 0.0]] * 3])
    assert float(potts_term(same, w)) == pytest.approx(0.0, abs=1e-7)
    split = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    expected = 2 * (w[0, 0, 2] + w[0, 1, 2]) / w.sum()
    assert float(potts_term(split, w)) == pytest.approx(float(expected))


def test_consistency_loss_prefers_label_consistent_embeddings() -> None:
    labels = torch.tensor([[0, 0, 1, 1, -1]])
    good = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]]])
    bad = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    l_good, n = consistency_loss(good, labels, 0.5)
    l_bad, _ = consistency_loss(bad, labels, 0.5)
    assert n == 12  # 4 ordered positive pairs (no self pairs) + 8 ordered negative pairs
    assert float(l_good) < 0.1 * float(l_bad)


def test_scribble_cell_labels() -> None:
    t = torch.full((1, 8, 8), 255)
    t[0, 0, 0] = 1  # cell (0, 0): class 1
    t[0, 0, 4], t[0, 1, 5] = 2, 0  # cell (0, 1): two classes -> none
    t[0, 5, 5] = 7  # out of range (3 classes) -> ignored
    labels = scribble_cell_labels(t, 3, (2, 2))
    assert labels.tolist() == [[1, -1, -1, -1]]
    assert grid_shape(320, 320, 32) == (32, 32) and grid_shape(96, 64, 24) == (24, 16) and grid_shape(5, 5, 32) == (5, 5)


def test_dfr_loss_trains_head_and_detaches_kernel() -> None:
    torch.manual_seed(0)
    loss_fn = DFRLoss(in_channels=8, num_classes=3, size=8, consistency_weight=1.0)
    logits = torch.randn(2, 3, 32, 32, requires_grad=True)
    feats = torch.randn(2, 8, 8, 8, requires_grad=True)
    target = torch.full((2, 32, 32), 255)
    target[:, 2:6, 2:20], target[:, 20:24, 4:28] = 1, 0
    roi = torch.ones(2, 32, 32, dtype=torch.bool)
    roi[1, 24:] = False
    loss, parts = loss_fn(logits.softmax(1), feats, _image(2, 32, 32), target, roi, step=0)
    loss.backward()
    assert {"dfr_potts", "dfr_consistency"} <= set(parts) and 0 <= float(parts["dfr_potts"]) <= 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.head.parameters())
    assert logits.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    # With the consistency term off, the features get no gradient: the kernel is detached.
    loss_fn.consistency_weight = 0.0
    feats.grad = None
    loss, _ = loss_fn(logits.softmax(1), feats, _image(2, 32, 32), target, roi, step=0)
    loss.backward()
    assert feats.grad is None or feats.grad.abs().sum() == 0
    # Warm-up: before warmup_steps only the head's loss is there.
    loss_fn.warmup_steps = 10
    _, parts = loss_fn(logits.softmax(1), feats, _image(2, 32, 32), target, roi, step=3)
    assert "dfr_potts" not in parts


def test_dfr_head_labels_only_scribbled_cells_before_prediction_labels_start() -> None:
    """Before prediction_labels_from_step the head's pairs come from scribble cells alone; from it on, cells the
    network predicts confidently join them."""
    confident = torch.zeros(1, 3, 32, 32)
    confident[:, 0] = 1.0  # every pixel predicted background with probability 1
    target = torch.full((1, 32, 32), 255)
    target[:, 0:4, 0:4], target[:, 28:32, 28:32] = 1, 2  # two scribbled cells of an 8 x 8 grid
    loss_fn = DFRLoss(in_channels=4, num_classes=3, size=8, prediction_labels_from_step=5)
    args = (confident, torch.randn(1, 4, 8, 8), _image(1, 32, 32), target, None)
    assert float(loss_fn(*args, step=4)[1]["dfr_labelled_cells"]) == pytest.approx(2 / 64)
    assert float(loss_fn(*args, step=5)[1]["dfr_labelled_cells"]) == 1.0


def _seg_cfg(**over) -> OmegaConf:
    cfg = OmegaConf.structured(SegConfig)
    cfg.merge_with(over)
    return cfg


def test_build_regularizers_and_vit_segmenter() -> None:
    from wsss.models.segmenter import Segmenter

    seg = _seg_cfg(arch="vitseg", arch_kwargs={"decoder_channels": 16, "patch_size": 8},
                   encoder={"name": "test_vit", "weights": "none"})
    net = Segmenter(seg.arch, seg.encoder, 3, dict(seg.arch_kwargs))
    out = net(torch.randn(2, 3, 40, 56), with_features=True)  # 40 is not a multiple of the patch: resized
    assert out["logits"].shape == (2, 3, 40, 56) and out["features"].shape[1] == 16
    context = RegularizerContext(3, decoder_channels(net))
    reg = build_regularizer("dfr", None, context)
    assert reg.needs_features and reg.dfr.head.net[0].in_channels == 16
    crf = build_regularizer("densecrf", None, context)
    assert not crf.needs_features and not list(crf.parameters())
    image = _image(2, 40, 56)
    target = torch.full((2, 40, 56), 255)
    target[:, 5:8, 5:30] = 1
    batch = {"image": image, "target": target, "roi": torch.ones(2, 40, 56, dtype=torch.bool)}
    loss, parts = reg(out, batch, 0)
    loss.backward()
    assert {"densecrf_loss", "dfr_potts", "dfr_consistency"} <= set(parts) and torch.isfinite(loss)
    frozen_cfg = _seg_cfg(arch="vitseg", arch_kwargs={"decoder_channels": 16},
                          encoder={"name": "test_vit", "weights": "none", "frozen_stages": 2})
    frozen = Segmenter(frozen_cfg.arch, frozen_cfg.encoder, 3, dict(frozen_cfg.arch_kwargs))
    vit = frozen.model.encoder.model
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    assert not any(p.requires_grad for p in vit.blocks[1].parameters())
    assert all(p.requires_grad for p in vit.blocks[2].parameters())
