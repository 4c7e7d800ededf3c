"""PMM components on hand-computed cases: CoV smoothing, PPMG, PUF, multi-crop windows, SEAM loss pieces.

Expected values are worked out in the comments from the formulas in reference-methods.md §1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from wsss.pseudo.cov import coefficient_of_variation, cov_smooth
from wsss.cam.multicrop import crop_windows, multicrop_cams
from wsss.config import PseudoConfig
from wsss.crf.presets import PRESETS
from wsss.losses.puf import pretended_under_fitting
from wsss.losses.seam import adaptive_min_pooling, max_norm, max_onehot, ohem_l1, with_background
from wsss.models.seam import pcm, pcm_input
from wsss.pseudo import build_generator
from wsss.pseudo.ppmg import PPMGOptions, make_ppmg_generator, ppmg_labels, proportional_labels
from wsss.pseudo.threshold import threshold_mask


# The CRF and these losses are many small tensor ops: one thread is faster and steadier (conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- CoV smoothing (§1.5) ----------------------------------------------------------------------

def test_cov_smoothing_on_both_sides_of_the_threshold():
    v = np.array([[[0.0, 0.04, 0.05], [0.2, 0.6, 1.0]],      # class A: values below, at and above t = 0.05
                  [[0.01, 0.03, 0.0], [0.02, 0.04, 0.049]]], np.float32)  # class B: nothing above t
    # A: statistics over v > t (strict): {0.2, 0.6, 1.0}; mean 0.6, population std sqrt(0.32 / 3).
    cv_a = 0.3 * math.sqrt(0.32 / 3) / 0.6
    cv = coefficient_of_variation(v, scale=0.3, threshold=0.05)
    assert cv == pytest.approx([cv_a, 0.0], abs=1e-6)
    out = cov_smooth(v, scale=0.3, threshold=0.05)
    e = 1 - cv_a  # 0.8367
    # Below t -> 0; v >= t (0.05 included, although it is not in the statistics) -> v ** (1 - cv).
    expected_a = [[0.0, 0.0, 0.05 ** e], [0.2 ** e, 0.6 ** e, 1.0]]
    np.testing.assert_allclose(out[0], expected_a, rtol=1e-5, atol=1e-7)
    assert out[0, 1, 0] > 0.2 and out[0, 1, 1] > 0.6  # the exponent < 1 expands activations
    np.testing.assert_array_equal(out[1], np.zeros((2, 3)))  # B: all below t, cv = 0 -> zeroed
    assert out.dtype == np.float32


def test_cov_on_threshold_masks_is_threshold_of_smoothed_maps():
    rng = np.random.default_rng(0)
    cams = rng.random((2, 6, 7)).astype(np.float32) ** 3
    classes = np.array([3, 5])
    settings = PseudoConfig(method="threshold", bg_threshold=0.3)
    settings.cov.enabled = True
    gen = build_generator("threshold", settings)
    expected = threshold_mask(classes, cov_smooth(cams, 0.3, 0.05), 0.3)
    np.testing.assert_array_equal(gen(classes, cams, None), expected)
    assert "image" not in gen.needs
    # and smoothing changed something on this input (otherwise the check above proves nothing)
    assert (expected != threshold_mask(classes, cams, 0.3)).any()


# ---- PPMG (§1.6) ---------------------------------------------------------------------------------

def test_proportional_labels_with_overlapping_foregrounds():
    # 1 x 6 image, two classes. Pixels 1-2 are foreground for both, pixel 4 for none,
    # pixel 5 is foreground for class 1 but has v = 0 everywhere.
    v1 = np.array([0.9, 0.8, 0.6, 0.0, 0.3, 0.0])
    f1 = np.array([1, 1, 1, 0, 0, 1], bool)
    v2 = np.array([0.0, 0.3, 0.5, 0.4, 0.2, 0.0])
    f2 = np.array([0, 1, 1, 1, 0, 0], bool)
    # P1 = v1 / (1 + 0.9 + 0.8 + 0.6 + 0.0) = v1 / 3.3;  P2 = v2 / (1 + 0.3 + 0.5 + 0.4) = v2 / 2.2
    # pixel 1: 0.8/3.3 = 0.242 > 0.3/2.2 = 0.136 -> class 1
    # pixel 2: 0.6/3.3 = 0.182 < 0.5/2.2 = 0.227 -> class 2, although v1 > v2 there (proportional, not raw)
    # pixel 4: no foreground -> background; pixel 5: all scores 0 -> argmax 0 = background
    labels = proportional_labels(np.stack([v1, v2])[:, None], np.stack([f1, f2])[:, None])
    np.testing.assert_array_equal(labels[0], [1, 1, 2, 2, 0, 0])
    assert np.stack([v1, v2])[:, 2].argmax() == 0  # a raw argmax would have said class 1 at pixel 2


def _two_objects(h: int = 24, w: int = 32):
    """A grey image with a red and a blue square, and CAMs that peak inside each and leak a bit."""
    img = np.full((h, w, 3), 120, np.uint8)
    img[4:14, 3:13] = (220, 30, 30)
    img[8:20, 16:28] = (30, 40, 220)
    yy, xx = np.mgrid[0:h, 0:w]
    cam1 = np.exp(-((yy - 9) ** 2 + (xx - 8) ** 2) / 30.0)
    cam2 = np.exp(-((yy - 14) ** 2 + (xx - 22) ** 2) / 40.0)
    truth = np.zeros((h, w), np.uint8)
    truth[4:14, 3:13] = 4
    truth[8:20, 16:28] = 9
    return img, np.stack([cam1, cam2]).astype(np.float32), truth


def test_ppmg_recovers_two_objects_and_cov_feeds_only_the_crf():
    img, cams, truth = _two_objects()
    classes = np.array([4, 9])
    params = PRESETS["pmm_ppmg"]
    labels = ppmg_labels(img, classes, cams, 11.0, params)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 4, 9}
    assert (labels == truth).mean() > 0.9
    assert not (labels == 255).any()  # PPMG has no ignore label
    # The generator with CoV on: the CRF sees the smoothed maps, the proportions the raw maps.
    smoothed = cov_smooth(cams, 0.3, 0.05)
    expected = ppmg_labels(img, classes, cams, 11.0, params, smoothed=smoothed)
    np.testing.assert_array_equal(make_ppmg_generator(11.0, 0.5, params, (0.3, 0.05))(classes, cams, img), expected)
    settings = PseudoConfig(method="ppmg")  # the registered generator with the default options does the same
    settings.cov.enabled = True
    np.testing.assert_array_equal(build_generator("ppmg", settings, PPMGOptions())(classes, cams, img), expected)
    # Peaky CAMs (cubed): without CoV the CRF keeps no foreground at all; the smoothing expands it back.
    peaky = cams ** 3
    assert (ppmg_labels(img, classes, peaky, 11.0, params) == 0).all()
    with_cov = ppmg_labels(img, classes, peaky, 11.0, params, smoothed=cov_smooth(peaky, 0.3, 0.05))
    assert (with_cov == truth).mean() > 0.9


def test_ppmg_matches_pydensecrf_reference():
    """Our PPMG (PyTorch lattice CRF) against the same steps on pydensecrf, as the official code runs them."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    img, cams, _ = _two_objects()
    h, w = img.shape[:2]
    smoothed = cov_smooth(cams, 0.3, 0.05)
    fg = []
    for s in smoothed:
        probs = np.stack([(1 - s) ** 11, s]).astype(np.float32)
        d = dcrf.DenseCRF2D(w, h, 2)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
        d.addPairwiseGaussian(3, compat=10)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(img), compat=10)
        fg.append(np.array(d.inference(10)).reshape(2, h, w)[1] > 0.5)
    reference = np.array([0, 4, 9], np.uint8)[proportional_labels(cams, np.stack(fg))]
    ours = ppmg_labels(img, np.array([4, 9]), cams, 11.0, PRESETS["pmm_ppmg"], smoothed=smoothed)
    assert (ours == reference).mean() > 0.99


def test_ppmg_without_classes_is_background():
    img = np.zeros((5, 6, 3), np.uint8)
    out = ppmg_labels(img, np.zeros(0, np.int64), np.zeros((0, 5, 6), np.float32), 11.0, PRESETS["pmm_ppmg"])
    np.testing.assert_array_equal(out, np.zeros((5, 6), np.uint8))


# ---- PUF (§1.7) ----------------------------------------------------------------------------------

def _logits_with_losses(losses: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits [0, z] with target 0, so that each pixel's CE is log(1 + e^z) = the given loss.
    One extra pixel at the end is ignored (255). Shapes (1, 2, 1, P+1) and (1, 1, P+1)."""
    z = torch.tensor([math.log(math.expm1(x)) for x in losses] + [3.0], dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(z), z])[None, :, None].clone().requires_grad_(True)
    target = torch.zeros(1, 1, len(z), dtype=torch.long)
    target[..., -1] = 255
    return logits, target


def test_puf_just_below_beta_clamps_and_stops_the_gradient_of_clamped_pixels():
    logits, target = _logits_with_losses([0.4, 0.4, 0.4, 1.2])
    # mean over all 5 pixels, the ignored one counting 0: 2.4 / 5 = 0.48 < beta = 0.5 -> clamp at k = 0.5
    loss = pretended_under_fitting(logits, target, "clamp", beta=0.5, k=0.5)
    assert loss.item() == pytest.approx((0.4 * 3 + 0.5) / 5, abs=1e-9)
    loss.backward()
    grad = logits.grad[0, :, 0]  # (2, 5)
    assert torch.all(grad[:, 3] == 0)  # the clamped (presumed noisy) pixel no longer pulls
    assert torch.all(grad[:, 4] == 0)  # the ignored pixel never did
    assert torch.all(grad[1, :3] > 0)  # the others still learn


def test_puf_just_above_beta_is_plain_ce_over_all_pixels():
    logits, target = _logits_with_losses([0.4, 0.4, 0.4, 1.4])
    # 2.6 / 5 = 0.52 >= 0.5: no transformation; mmseg 0.x divides by all 5 pixels, ignored one included
    loss = pretended_under_fitting(logits, target, "clamp", beta=0.5, k=0.5)
    assert loss.item() == pytest.approx(2.6 / 5, abs=1e-9)
    loss.backward()
    assert torch.all(logits.grad[0, 1, 0, :4] > 0)


@pytest.mark.parametrize("kind, expected", [
    # every pixel loss -> (l + 1e-9)^k, the ignored pixel too: it contributes (1e-9)^0.5 = 3.2e-5 (as mmseg's)
    ("pow", ((0.4 + 1e-9) ** 0.5 * 3 + (1.2 + 1e-9) ** 0.5 + 1e-9 ** 0.5) / 5),
    ("ignore", (0.4 * 3 + 0.0) / 5),                              # pixels with l > k -> 0
])
def test_puf_other_variants(kind, expected):
    logits, target = _logits_with_losses([0.4, 0.4, 0.4, 1.2])
    loss = pretended_under_fitting(logits, target, kind, beta=0.5, k=0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-7)


# ---- multi-crop windows (§1.3, §1.4, §7) -----------------------------------------------------------

SCALES = [0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0]


def test_multicrop_windows_for_500x375():
    windows = crop_windows(500, 375, SCALES, crop=448, stride=300)
    assert len(windows) == 87
    per_scale = [len(crop_windows(500, 375, [s], 448, 300)) for s in SCALES]
    # columns x rows: 1+ceil(max(0, int(500 s) - 448) / 300) x the same for int(375 s)
    assert per_scale == [1, 2, 4, 6, 6, 9, 12, 12, 15, 20]
    # scale 0.75: one window over the 375 x 281 image; int(281 / 0.75) = 374 (the official truncation)
    assert windows[0] == (0, 0, 500, 374)
    # scale 1.0: [0, 300] (stride wide, not 448) and the last one [500 - 448, 500]
    assert windows[1:3] == [(0, 0, 300, 375), (52, 0, 500, 375)]
    # scale 1.25 (625 x 468): x spans [0, 300], [177, 625]; y spans [0, 300], [20, 468]; divided by 1.25
    assert windows[3:7] == [(0, 0, 240, 240), (0, 16, 240, 374), (141, 0, 500, 240), (141, 16, 500, 374)]
    # scale 3.0 (1500 x 1125): the last window is [1052, 1500] x [677, 1125] / 3
    assert windows[-1] == (350, 225, 500, 375)


def test_multicrop_merge_unflips_and_averages():
    """With a 'network' that returns its input, the merged map is the (min-max normalised) image."""
    h, w = 30, 40
    ramp = torch.linspace(0, 1, w).repeat(h, 1) + torch.linspace(0, 0.5, h)[:, None]  # asymmetric left/right
    image = torch.stack([ramp, ramp, ramp])
    windows = crop_windows(w, h, [1.0, 1.5], crop=24, stride=16)
    assert len(windows) > 4

    def identity(x):  # (B, 3, 24, 24) -> (B, 2, 12, 12): two "classes", at half resolution like a CNN
        return torch.nn.functional.avg_pool2d(x[:, :2], 2)

    out = multicrop_cams(identity, image, torch.tensor([0, 1]), windows, crop=24, flip=True, batch_size=5)
    expected = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    assert out.shape == (2, h, w) and out.min() >= 0 and out.max() <= 1
    assert (out[0] - expected).abs().mean() < 0.03  # a wrong un-flip would mirror the ramp (error ~0.3)


# ---- SEAM loss pieces (§1.2) -----------------------------------------------------------------------

def test_max_norm_and_max_onehot():
    x = torch.tensor([[[[0.0, 1.0, 3.0]], [[-2.0, 2.0, 2.0]]]])  # (1, 2, 1, 3)
    out = max_norm(x)
    # channel 0: relu -> [0, 1, 3], min 0, max 3: relu(x - 0 - 1e-5) / (3 + 1e-5)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, (1 - 1e-5) / (3 + 1e-5), (3 - 1e-5) / (3 + 1e-5)]))
    # channel 1: relu -> [0, 2, 2]
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([0.0, (2 - 1e-5) / (2 + 1e-5), (2 - 1e-5) / (2 + 1e-5)]))
    cam = torch.tensor([[[[0.9]], [[0.2]], [[0.7]], [[0.7]]]])  # bg, then 3 foreground channels; a tie at 0.7
    torch.testing.assert_close(max_onehot(cam).flatten(), torch.tensor([0.9, 0.0, 0.7, 0.7]))
    torch.testing.assert_close(with_background(cam).flatten(), torch.tensor([0.3, 0.2, 0.7, 0.7]))


def test_adaptive_min_pooling_and_ohem():
    fg = torch.tensor([[[[0.1, 0.8], [0.5, 0.0]], [[0.3, 0.2], [0.4, 0.05]]]])  # (1, 2, 2, 2)
    # per-pixel max over classes: [0.3, 0.8, 0.5, 0.05]; k = 4 // 4 = 1 -> the weakest, 0.05
    assert adaptive_min_pooling(fg).item() == pytest.approx(0.05)
    a = torch.zeros(1, 1, 2, 5)
    b = torch.tensor([[[[0.1, 0.9, 0.2, 0.8, 0.3], [0.0, 0.4, 0.7, 0.6, 0.5]]]])
    # 10 entries, top 20% = the 2 largest |a - b|: 0.9 and 0.8
    assert ohem_l1(a, b, 0.2).item() == pytest.approx(0.85)


def test_pcm_input_and_pcm_propagation():
    cam = torch.tensor([[[[5.0, 0.0]], [[1.0, 2.0]], [[4.0, 3.0]]]])  # (1, 3, 1, 2): bg + 2 classes
    d = pcm_input(cam)
    # max-normalised ((x - 1e-5) / (max + 1e-5)): class 1 [1, 2] -> [.5, 1]; class 2 [4, 3] -> [1, .75].
    # Per pixel only the strongest foreground class is kept; bg = 1 - max foreground = 0 at both pixels.
    expected = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(d[0, :, 0], expected, atol=1e-4, rtol=0)
    assert d.requires_grad is False
    c = torch.rand(1, 3, 2, 3)
    one_hot = torch.eye(6).view(1, 6, 2, 3)  # orthogonal features: affinity = identity -> unchanged
    torch.testing.assert_close(pcm(c, one_hot), c, atol=1e-4, rtol=1e-4)
    same = torch.ones(1, 4, 2, 3)  # identical features: every pixel becomes the image mean
    torch.testing.assert_close(pcm(c, same), c.mean((2, 3), keepdim=True).expand_as(c), atol=1e-4, rtol=1e-4)


def test_seam_net_and_loss_train_the_new_layers():
    from wsss.cam.methods import SeamOptions
    from wsss.config import BackboneConfig
    from wsss.losses.seam import seam_loss
    from wsss.models.seam import SeamCAMNet

    torch.manual_seed(0)
    net = SeamCAMNet(OmegaConf.structured(BackboneConfig(name="test_resnet", output_stride=8)), 4)
    x = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss, parts = seam_loss(net, x, labels, SeamOptions())
    assert torch.isfinite(loss) and set(parts) == {"cls", "amp", "er", "ecr"}
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-5)  # amp_weight 1
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.new_parameters())
    cams = net.infer_cams(x, "cam_rv")
    assert cams.shape == (2, 3, 6, 6) and cams.min() >= 0  # foreground channels only, PCM output >= 0
