"""CPN and AA&LR on tiny cases: complementary pairs, PRCM, every loss at a hand-computed value, and a
tiny end-to-end `wsss run` of each shapes recipe. Expected values are worked out in the comments."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsss.cam.patches import ComplementaryPairSet, grid_mask, superpixel_mask
from wsss.losses.aalr import adaptive_affinity_loss, cam_pseudo_labels, label_reassign
from wsss.losses.cpn import complementary_terms, cpn_loss, max_onehot_all
from wsss.models.cpn import PRCM, spatial_gather

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blocks(h: int = 32, w: int = 32) -> np.ndarray:
    """A (h, w, 3) image in [0, 1] of four flat coloured quadrants plus noise (SLIC has edges to follow)."""
    img = np.zeros((h, w, 3))
    img[: h // 2, : w // 2] = (1, 0, 0)
    img[: h // 2, w // 2 :] = (0, 1, 0)
    img[h // 2 :, : w // 2] = (0, 0, 1)
    img[h // 2 :, w // 2 :] = (1, 1, 0)
    return (img + np.random.default_rng(0).normal(0, 0.02, img.shape)).clip(0, 1)


# ---- complementary patch pairs -------------------------------------------------------------------

@pytest.mark.parametrize("replacement", [True, False])
def test_superpixel_views_are_complementary_and_hide_whole_superpixels(replacement):
    from skimage.segmentation import slic

    img = _blocks()
    keep, kept = superpixel_mask(img, np.random.default_rng(3), n_segments=16, replacement=replacement)
    x = torch.randn(3, 32, 32)
    m = torch.from_numpy(keep).float()
    v1, v2 = x * m, x * (1 - m)
    torch.testing.assert_close(v1 + v2, x)  # the two views add up to the crop
    assert not ((v1 != 0) & (v2 != 0)).any()  # and no pixel is visible in both
    assert kept == pytest.approx(keep.mean()) and 0 < kept < 1
    spx = slic(img, n_segments=16, compactness=10.0, start_label=1, channel_axis=-1)
    hidden = [s for s in np.unique(spx) if not keep[spx == s].any()]
    assert all(keep[spx == s].all() or not keep[spx == s].any() for s in np.unique(spx))  # whole superpixels
    top = int(spx.max())
    if replacement:  # floor(0.5 (max_id + 1)) draws from 0..max_id with repeats: at most that many hidden
        assert 1 <= len(hidden) <= (top + 1) // 2
    else:
        assert len(hidden) == round(top * 0.5)


def test_code_draw_hides_about_39_percent_of_superpixels():
    # k = floor(n / 2) draws with replacement from ids 0..n-1 (n = max_id + 1; id 0 does not exist,
    # start_label=1): a superpixel escapes all draws with probability (1 - 1/n)^k, so the expected hidden
    # fraction is 1 - (1 - 1/n)^k, ~1 - e^-0.5 = 39% for large n, not the nominal half.
    from skimage.segmentation import slic

    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    img = np.stack([yy, xx, (yy + xx) / 2], -1)
    spx = slic(img, n_segments=300, compactness=10.0, start_label=1, channel_axis=-1)
    n = int(spx.max()) + 1
    assert n > 100
    fractions = []
    for seed in range(30):
        keep, _ = superpixel_mask(img, np.random.default_rng(seed), n_segments=300)
        fractions.append(len(np.unique(spx[~keep])) / (n - 1))
    expected = 1 - (1 - 1 / n) ** (n // 2)
    assert np.mean(fractions) == pytest.approx(expected, abs=0.02) and np.mean(fractions) < 0.42


def test_grid_mask_hides_whole_cells_and_counts_cells():
    keep, kept = grid_mask(3, 5, np.random.default_rng(0), grid_sizes=[2], hide_prob=0.5)
    cells = [keep[y : y + 2, x : x + 2] for y in (0, 2) for x in (0, 2, 4)]  # 2 x 3 cells, the last ones partial
    assert all(c.all() or not c.any() for c in cells)
    assert kept == pytest.approx(sum(c.all() for c in cells) / 6)  # cells, not pixels (the code's count)
    keep, kept = grid_mask(4, 4, np.random.default_rng(0), grid_sizes=[4], hide_prob=1.0)
    assert not keep.any() and kept == 0.0


def test_pair_set_adds_mask_and_kept_fraction():
    base = [{"image": torch.from_numpy(_blocks().transpose(2, 0, 1) * 255).float(), "labels": torch.ones(2)}]
    o = SimpleNamespace(strategy="superpixel", n_segments=16, compactness=10.0, hide_fraction=0.5, replacement=True,
                        grid_sizes=[16], hide_prob=0.5)
    torch.manual_seed(0)
    s = ComplementaryPairSet(base, o)[0]
    assert s["cp_mask"].shape == (32, 32) and s["cp_mask"].dtype == torch.bool
    assert float(s["cp_kept"]) == pytest.approx(s["cp_mask"].float().mean().item())


# ---- PRCM ----------------------------------------------------------------------------------------

def _prcm_case(keys: str) -> tuple[PRCM, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = torch.tensor([[[[1.0, 0.0, 0.2]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.8]]]])  # 3 classes on a 1 x 3 map
    f = torch.arange(12, dtype=torch.float32).view(1, 4, 1, 3) / 10 - 0.3
    f9 = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.5, 0.0]])
    m = PRCM(4, 2, keys)
    with torch.no_grad():
        m.key.weight.copy_(torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.0, -0.5, 1.0, 1.0]]).view(2, 4, 1, 1))
    return m, d, f, torch.einsum("ed,ndhw->nehw", f9, f)


@pytest.mark.parametrize("keys", ["view", "transpose"])
def test_prcm_shape_and_normalisation(keys):
    torch.manual_seed(0)
    m = PRCM(7, 5, keys)
    sim = m(torch.rand(2, 4, 3, 5), torch.randn(2, 7, 3, 5), torch.randn(2, 5, 3, 5))
    assert sim.shape == (2, 4, 3, 5) and (sim >= 0).all()
    torch.testing.assert_close(sim.flatten(2).sum(2), torch.ones(2, 4))  # each class map: softmax over pixels


def test_prcm_matches_official_reshape_and_the_paper_transpose():
    # "view": reference numbers printed by the official Net.PRCM (Ferenas/CPN @aca29f3, with 21 -> 3
    # classes) and SpatialGather_Module on these inputs.
    m, d, f, emb = _prcm_case("view")
    official = [1 / 3, 1 / 3, 1 / 3, 0.3047908, 0.3324940, 0.3627152, 0.3023108, 0.3323391, 0.3653501]
    np.testing.assert_allclose(m(d, f, emb).flatten().detach().numpy(), official, atol=1e-6)
    # "transpose" by hand: region r_c = sum_p softmax_p(d_c) f_p, key_c = relu(W r_c),
    # sim_c = softmax_p(key_c . relu(emb_p) / sqrt(3))
    m, d, f, emb = _prcm_case("transpose")
    w = m.key.weight.view(2, 4)
    expected = []
    for c in range(3):
        key = torch.relu(w @ (torch.softmax(d[0, c, 0], 0) @ f[0, :, 0].T))
        expected.append(torch.softmax(key @ torch.relu(emb[0, :, 0]) / math.sqrt(3), 0))
    torch.testing.assert_close(m(d, f, emb)[0, :, 0], torch.stack(expected))
    assert spatial_gather(f, d).shape == (1, 4, 3)


def test_bad_options_are_config_errors_when_the_recipe_loads():
    from wsss.cam.cpn import CPNOptions
    from wsss.config import load_recipe
    from wsss.engine.aalr import AALROptions
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError, match="cam.cpn.prcm_keys: 'paper'"):
        load_recipe("configs/shapes_cpn.yaml", ["cam.cpn.prcm_keys=paper"])
    with pytest.raises(ConfigError, match="seg.aalr.ignore_band"):
        load_recipe("configs/shapes_aalr.yaml", ["seg.aalr.ignore_band=[0.5,0.1]"])
    for build in (lambda: CPNOptions(strategy="hexagons"), lambda: AALROptions(lr_temperature=0)):
        with pytest.raises(ConfigError):  # the options objects check themselves wherever they are built
            build()


# ---- CPN losses ----------------------------------------------------------------------------------

def test_max_onehot_over_all_channels():
    x = torch.tensor([0.2, 0.5, 0.1]).view(1, 3, 1, 1)
    assert max_onehot_all(x).flatten().tolist() == [0.0, 0.5, 0.0]  # background competes too (CPN's version)


def test_complementary_terms_by_hand():
    # N=1, C=2 (bg + 1 fg), 1 x 2 pixels. Foreground values:
    t = lambda fg: torch.tensor([[[[0.0, 0.0]], [fg]]])  # noqa: E731  (background set inside)
    c, c1, c2 = t([0.8, 0.2]), t([0.5, 0.0]), t([0.2, 0.1])
    r, r1, r2 = t([0.9, 0.4]), t([0.4, 0.1]), t([0.3, 0.2])
    # tcp = mean|c1 + c2 - c| + mean|r - r1 - r2| = mean(0.1, 0.1) + mean(0.2, 0.1) = 0.1 + 0.15
    # with background 1 - fg: c - c1 = [bg: 0.2-(-0.3)... ] per pixel: c = (0.2, 0.8 | 0.8, 0.2),
    # c1 = (0.5, 0.5 | 1.0, 0.0), c2 = (0.8, 0.2 | 0.9, 0.1)   (pixel 0: bg, fg | pixel 1: bg, fg)
    # c - c1 = (-0.3, 0.3 | -0.2, 0.2) -> max_onehot: (0, 0.3 | 0, 0.2);  r2 = (0.7, 0.3 | 0.8, 0.2)
    #   |.| = (0.7, 0.0 | 0.8, 0.0), top 50% of 4 entries = {0.8, 0.7} -> 0.75
    # c - c2 = (-0.6, 0.6 | -0.1, 0.1) -> (0, 0.6 | 0, 0.1);  r1 = (0.6, 0.4 | 0.9, 0.1)
    #   |.| = (0.6, 0.2 | 0.9, 0.0), top 2 = {0.9, 0.6} -> 0.75
    tcp, cpcr = complementary_terms(c, r, c1, r1, c2, r2, topk=0.5)
    assert tcp.item() == pytest.approx(0.25)
    assert cpcr.item() == pytest.approx(1.5)


def test_cpn_loss_without_pair_is_mlsm_plus_amp():
    # a "network" with a constant CAM: fg logit 2 everywhere, bg 0; cam_rv fg 0.5 on a 2 x 2 map
    class Const(torch.nn.Module):
        def forward(self, x):
            n = x.shape[0]
            cam = torch.cat([torch.zeros(n, 1, 2, 2), torch.full((n, 1, 2, 2), 2.0)], 1)
            return {"cam": cam, "cam_rv": cam / 4}

    o = SimpleNamespace(pair=False, amp_weight=1.0)
    loss, parts = cpn_loss(Const(), torch.zeros(1, 3, 4, 4), torch.tensor([[1.0]]), None, None, o)
    # MLSM(2, y=1) = log(1 + e^-2); AMP = mean of relu over the hw/4 = 4 weakest per-pixel maxima = 0.5
    assert parts["cls"].item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-5)
    assert parts["amp"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2)) + 0.5, rel=1e-5)


# ---- AA&LR losses --------------------------------------------------------------------------------

def test_cam_pseudo_labels_by_hand():
    cams = torch.tensor([[[[4.0, 2.0, 0.4, -1.0]], [[0.0, 3.0, 0.0, 9.0]]]])  # 2 fg classes, 1 x 4
    labels = torch.tensor([[1.0, 0.0]])  # class 2 absent: its map is ignored however strong
    # class 1 normalised: (1, 0.5, 0.1, 0); bg 0.15 -> labels 1, 1, 0, 0
    assert cam_pseudo_labels(cams, labels, (1, 4), 0.15).tolist() == [[[1, 1, 0, 0]]]
    # band [0.05, 0.6): pixels 1 (0.5) and 2 (0.1) uncertain -> 255
    assert cam_pseudo_labels(cams, labels, (1, 4), 0.15, [0.05, 0.6]).tolist() == [[[1, 255, 255, 0]]]


def test_adaptive_affinity_loss_by_hand():
    p = torch.tensor([[[[0.8, 0.6]], [[0.2, 0.4]]]])  # 2 classes, two pixels side by side
    a = 0.8 * 0.6 + 0.2 * 0.4  # predicted affinity 0.56
    # same foreground label: -log a in the fg-positive group, weight 1/4
    aa = adaptive_affinity_loss(p, torch.tensor([[[1, 1]]]), dilations=[1])
    assert aa.item() == pytest.approx(-math.log(a) / 4, rel=1e-4)
    # background pair: the bg-positive group, also 1/4
    assert adaptive_affinity_loss(p, torch.tensor([[[0, 0]]]), [1]).item() == pytest.approx(-math.log(a) / 4, rel=1e-4)
    # different labels: -log(1 - a), weight 1/2
    assert adaptive_affinity_loss(p, torch.tensor([[[0, 1]]]), [1]).item() == pytest.approx(-math.log(1 - a) / 2, rel=1e-4)
    # an unlabelled pixel: no pair, no loss
    assert adaptive_affinity_loss(p, torch.tensor([[[0, 255]]]), [1]).item() == 0.0


def test_adaptive_affinity_groups_are_averaged_separately():
    # 1 x 3: labels (0, 0, 1), offsets right at dilations 1 and 2 (diagonals fall outside one row):
    # pairs (0,1) bg-positive; (1,2) and (0,2) negative. One-hot predictions -> affinities 1, 0, 0.
    p = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]])
    loss = adaptive_affinity_loss(p, torch.tensor([[[0, 0, 1]]]), [1, 2], eps=1e-5)
    assert loss.item() == pytest.approx(-math.log(1 - 1e-5) / 4 + -math.log(1 - 1e-5) / 2, abs=1e-6)  # all pairs right
    # labels (0, 1, 1): (0,1) negative with affinity 1 (-log eps), (0,2) negative with affinity 0 (~0),
    # (1,2) fg-positive with affinity 0 (-log eps): negatives' mean bad/2 at weight 1/2, fg-positive bad at 1/4
    bad = -math.log(1e-5)
    loss = adaptive_affinity_loss(p, torch.tensor([[[0, 1, 1]]]), [1, 2], eps=1e-5)
    assert loss.item() == pytest.approx(bad / 4 + bad / 4, rel=1e-3)


def test_label_reassign_by_hand():
    # embeddings p0 = (1, 0), p1 = (0, 1), p2 = (0, 1); pseudo labels (0, 0, 1)
    feats = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]])
    target = torch.tensor([[[0, 0, 1]]])
    # prototypes: class 0 = normalise(p0 + p1) = (1, 1)/sqrt2, class 1 = (0, 1)
    # p1: cos to class 0 = 0.7071, to class 1 = 1 -> beats its label by 0.29 > 0.1: reassigned to 1
    new, loss = label_reassign(feats, target, num_classes=2, margin=0.1, temperature=0.1)
    assert new.tolist() == [[[0, 1, 1]]]
    s = 1 / math.sqrt(2)
    ce0 = math.log1p(math.exp(-(s - 0.0) / 0.1))  # p0: sims (0.707, 0), label 0
    ce1 = math.log1p(math.exp(-(1 - s) / 0.1))  # p1, p2: sims (0.707, 1), label 1
    assert loss.item() == pytest.approx((ce0 + 2 * ce1) / 3, rel=1e-4)
    # a margin above 0.29 keeps every label
    assert label_reassign(feats, target, 2, margin=0.5)[0].tolist() == [[[0, 0, 1]]]


def test_segmentation_set_image_source_has_no_pixel_labels(tmp_path):
    from wsss.config import DataConfig
    from wsss.data import build_dataset
    from wsss.data.transforms import SegmentationSet

    cfg = DataConfig(dataset="shapes", root=str(tmp_path))
    cfg.shapes.num_train, cfg.shapes.num_val, cfg.shapes.image_size = 2, 1, 16
    ds = build_dataset(cfg, "train")
    s = SegmentationSet(ds, "image", lambda image, masks: {"image": image, "masks": masks})[0]
    assert (s["target"] == 255).all() and s["labels"].sum() >= 0 and s["roi"].all()


# ---- end to end ------------------------------------------------------------------------------------

TINY = ["data.shapes.num_train=12", "data.shapes.num_val=4", "data.shapes.image_size=40",
        "cam.backbone.name=test_resnet", "seg.encoder.name=test_resnet", "cam.max_steps=2", "seg.max_steps=3",
        "cam.batch_size=6", "seg.batch_size=6", "cam.crop_size=40", "seg.crop_size=40", "cam_infer.scales=[1.0]",
        "trainer.num_workers=0", "trainer.threads=1", "report.samples=1"]


def _run(tmp: Path, recipe: str, *extra: str) -> dict:
    from wsss.cli import main

    main(["run", f"configs/{recipe}.yaml", f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY, *extra])
    return json.loads((tmp / "runs" / recipe / "manifest.json").read_text())


@pytest.mark.slow
def test_shapes_cpn_recipe_runs_end_to_end(tmp_path):
    stages = _run(tmp_path, "shapes_cpn")["stages"]
    assert [s for s, v in stages.items() if v["status"] == "done"] == \
        ["train_cam", "cam", "pseudo", "train_seg", "evaluate", "report"]
    log = (tmp_path / "runs" / "shapes_cpn" / "cam" / "logs" / "metrics.csv").read_text()
    assert "train/tcp" in log and "train/cpcr" in log  # the pair terms were trained
    assert 0.0 <= stages["evaluate"]["metrics"]["miou"] <= 1.0


@pytest.mark.slow
def test_shapes_aalr_recipe_is_single_stage(tmp_path):
    stages = _run(tmp_path, "shapes_aalr")["stages"]
    assert [s for s, v in stages.items() if v["status"] == "done"] == ["train_seg", "evaluate", "report"]
    assert stages["train_seg"]["metrics"]["labels"] == "image"
    assert not (tmp_path / "runs" / "shapes_aalr" / "pseudo").exists()
    log = (tmp_path / "runs" / "shapes_aalr" / "seg" / "logs" / "metrics.csv").read_text()
    assert "train/aa" in log and "train/lr" in log  # 3 steps, warm-up 50%: the seg losses ran
    assert 0.0 <= stages["evaluate"]["metrics"]["miou"] <= 1.0
