"""Permutohedral lattice vs the exact dense Gaussian filter, gradients, batching, filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.crf.exact import exact_gaussian_filter
from wsss.crf.filters import BilateralFilter, GaussianFilter, bilateral_features, bilateral_filter, gaussian_filter, spatial_features
from wsss.crf.lattice import LatticeFilterFunction, PermutohedralLattice, lattice_filter

VOC = Path(__file__).parents[2] / "shared" / "data" / "voc12-mini" / "VOC2012"


# The CRF and these losses are many small tensor ops: one thread is faster and steadier (conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tolerances. A permutohedral lattice is an approximation of the Gaussian: it splats to the d+1
# corners of the enclosing simplex, blurs with a 3-tap kernel per lattice direction and slices by
# barycentric interpolation, so its effective kernel is only roughly Gaussian, anisotropic, and
# depends on where a point falls in its simplex. Measured on row-normalised outputs (K v / K 1,
# weighted averages of values in [0, 1]) with the seeds below:
# * random features, 300 points: mean abs error 0.0028 (d=2), 0.0038 (d=5), 0.0029 (d=8);
#   max 0.015-0.027;
# * 32x32 image crops: xy (sigma 3) mean 0.0022-0.0023, max 0.015; xy+rgb (sigma 6, 10) mean
#   0.0027-0.0077, max up to 0.30 at pixels whose colour is unlike all their neighbours (there the
#   output is mostly the self term, and the lattice's self weight differs most from the exact one).
# Bounds are about 2x the measured values (max for xy+rgb: 0.5); a broken lattice (wrong ranks,
# keys, neighbours or weights) gives mean errors of 0.05-0.5.
ROW_TOL = {  # (mean abs error, max abs error) bounds for row-normalised outputs
    "xy": (0.005, 0.04),
    "xyrgb": (0.016, 0.5),
    "rand2": (0.006, 0.04),
    "rand5": (0.008, 0.06),
    "rand8": (0.008, 0.05),
}


def _check_row(features: torch.Tensor, values: torch.Tensor, tol: tuple[float, float]) -> None:
    got = lattice_filter(features, values, "row")
    want = exact_gaussian_filter(features.double(), values.double(), "row").float()
    err = (got - want).abs()
    assert err.mean() < tol[0], f"mean abs error {err.mean():.4f} >= {tol[0]}"
    assert err.max() < tol[1], f"max abs error {err.max():.4f} >= {tol[1]}"


@pytest.mark.parametrize("d,scale,key", [(2, 6.0, "rand2"), (5, 2.5, "rand5"), (8, 1.5, "rand8")])
def test_lattice_matches_exact_random(d: int, scale: float, key: str) -> None:
    g = torch.Generator().manual_seed(d)
    f = torch.rand(300, d, generator=g) * scale
    v = torch.rand(300, 3, generator=g)
    _check_row(f, v, ROW_TOL[key])


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A piecewise-smooth synthetic RGB image (uint8) for when the VOC crops are missing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 4 + 60 * (yy > h // 2)) % 256, (yy * 5) % 256, 128 + 60 * np.sin(xx / 5.0)], -1)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def _crop(seed: int) -> np.ndarray:
    """A 32x32 crop of a real VOC image if the data is there, else a synthetic one."""
    if VOC.is_dir():
        from PIL import Image

        ids = (VOC / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
        img = np.asarray(Image.open(VOC / "JPEGImages" / f"{ids[seed]}.jpg").convert("RGB"))
        y, x = img.shape[0] // 2 - 16, img.shape[1] // 2 - 16
        return np.ascontiguousarray(img[y : y + 32, x : x + 32])
    return _smooth_image(32, 32, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_lattice_matches_exact_image_crops(seed: int) -> None:
    img = torch.from_numpy(_crop(seed)).permute(2, 0, 1)[None].float()
    v = torch.rand(32 * 32, 4, generator=torch.Generator().manual_seed(seed))
    _check_row(spatial_features(32, 32, 3.0), v, ROW_TOL["xy"])
    feats, _ = bilateral_features(img, 6.0, 10.0)
    _check_row(feats, v, ROW_TOL["xyrgb"])


def test_unnormalised_scale_is_densecrf_convention() -> None:
    # The raw lattice (alpha included) is about half the exact Gaussian sum for d=5 image features,
    # as rloss's lattice is (reference-methods 5.1: 0.48-0.62x).
    img = torch.from_numpy(_crop(0)).permute(2, 0, 1)[None].float()
    feats, _ = bilateral_features(img, 6.0, 10.0)
    v = torch.ones(feats.shape[0], 1)
    ratio = (lattice_filter(feats, v, "none") / exact_gaussian_filter(feats.double(), v.double(), "none").float()).mean()
    assert 0.4 < float(ratio) < 0.75


def test_symmetric_normalisation_is_symmetric_and_bounded() -> None:
    f = torch.rand(200, 3, generator=torch.Generator().manual_seed(3)) * 3
    lat = PermutohedralLattice(f)
    a, b = torch.rand(200, 2), torch.rand(200, 2)
    # <a, K b> == <K^T a, b>, and K^T is the reversed-order filter (what backward uses).
    s, _ = lat.normalizer("symmetric")
    kb = lat.apply(b, lat.weights(s, s))
    kta = lat.apply(a, lat.weights(s, s), reverse=True)
    assert torch.allclose((a * kb).sum(), (kta * b).sum(), rtol=1e-5)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.rand(40, 3, generator=g, dtype=torch.float64) * 2
    lat = PermutohedralLattice(f)
    v = torch.rand(40, 2, generator=g, dtype=torch.float64, requires_grad=True)
    for norm in ("none", "symmetric", "row"):
        assert torch.autograd.gradcheck(lambda x: lat.filter(x, norm), (v,))
    in_s, out_s = torch.rand(40, dtype=torch.float64) + 0.5, torch.rand(40, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x: LatticeFilterFunction.apply(x, lat, in_s, out_s), (v,))


def test_batch_equals_separate_images() -> None:
    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.rand(150, 5, generator=g) * 3, torch.rand(120, 5, generator=g) * 3
    v1, v2 = torch.rand(150, 3, generator=g), torch.rand(120, 3, generator=g)
    batch = torch.cat([torch.zeros(150), torch.ones(120)]).long()
    lat = PermutohedralLattice(torch.cat([f1, f2]), batch)
    out = lat.filter(torch.cat([v1, v2]), "symmetric")
    assert torch.allclose(out[:150], PermutohedralLattice(f1).filter(v1, "symmetric"), atol=1e-5)
    assert torch.allclose(out[150:], PermutohedralLattice(f2).filter(v2, "symmetric"), atol=1e-5)


def test_hashed_keys_for_wide_features_match_exact() -> None:
    # 16-d features spread over a wide range overflow the exact 62-bit key packing, which switches
    # to hashed keys (with a collision check); results must still match the exact filter.
    g = torch.Generator().manual_seed(2)
    centres = torch.rand(6, 16, generator=g) * 400
    f = centres.repeat_interleave(20, 0) + torch.rand(120, 16, generator=g) * 0.6
    from wsss.crf.lattice import _KeyPacker, _embed

    _, q, _ = _embed(f)
    assert _KeyPacker(q, None, 16).hashed
    v = torch.rand(120, 2, generator=g)
    got = lattice_filter(f, v, "row")
    want = exact_gaussian_filter(f.double(), v.double(), "row").float()
    assert (got - want).abs().mean() < 0.1


def test_single_and_multi_channel_paths_agree() -> None:
    f = torch.rand(500, 5, generator=torch.Generator().manual_seed(4)) * 4
    lat = PermutohedralLattice(f)
    v = torch.rand(500, 3)
    multi = lat.filter(v, "symmetric")
    single = torch.cat([lat.filter(v[:, i : i + 1], "symmetric") for i in range(3)], 1)
    assert torch.allclose(multi, single, atol=1e-5)


def test_image_filters_shapes_grad_and_batch() -> None:
    img = torch.from_numpy(np.stack([_smooth_image(24, 20, s) for s in range(2)])).permute(0, 3, 1, 2).float()
    vals = torch.rand(2, 3, 24, 20, requires_grad=True)
    out = bilateral_filter(img, vals, 5.0, 12.0)
    assert out.shape == vals.shape
    out.sum().backward()
    assert vals.grad is not None and torch.isfinite(vals.grad).all()
    # batched filter == per-image filters
    single = BilateralFilter(img[1:], 5.0, 12.0)(vals[1:].detach())
    assert torch.allclose(out[1:].detach(), single, atol=1e-5)
    gauss = GaussianFilter(24, 20, 3.0, normalization="row")
    g = gauss(vals.detach())
    assert torch.allclose(g[1], gaussian_filter(vals[1:].detach(), 3.0, "row")[0], atol=1e-5)
    # a row-normalised filter keeps constants
    assert torch.allclose(gauss(torch.ones(1, 1, 24, 20)), torch.ones(1, 1, 24, 20), atol=1e-5)


def test_rank_by_sort_equals_pairwise(monkeypatch: pytest.MonkeyPatch) -> None:
    # High d (> 16) ranks coordinates with a sort instead of pairwise comparisons; same result,
    # including ties (broken by coordinate index, as densecrf does).
    import wsss.crf.lattice as lattice

    f = torch.rand(400, 6, generator=torch.Generator().manual_seed(5)) * 3
    f[:50] = 0.0  # every coordinate offset equal: exact ties
    pairwise = lattice._embed(f)
    monkeypatch.setattr(lattice, "_PAIRWISE_RANK_MAX_D", 0)
    by_sort = lattice._embed(f)
    for a, b in zip(pairwise, by_sort):
        assert torch.equal(a, b)
