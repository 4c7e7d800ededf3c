"""AuxSegNet: affinity modules on tiny tensors, the fusion rule and crf_for_sal against the official
code's outputs, the training data, and a tiny end-to-end run with resume by round."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsss.models.auxsegnet import AuxSegNetwork, CrossTaskFusion, TaskAffinity, affinity_bytes, propagate
from wsss.pseudo.auxsegnet import fuse_cam_saliency, saliency_crf


def _row_stochastic(n: int, hw: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, hw, hw, generator=g) * 3, -1)


def test_task_affinity_is_a_softmax_over_positions():
    torch.manual_seed(0)
    aff = TaskAffinity(4)
    feats = torch.randn(2, 4, 3, 5)
    a = aff(feats)
    assert a.shape == (2, 15, 15)
    assert torch.allclose(a.sum(-1), torch.ones(2, 15), atol=1e-6) and (a >= 0).all()
    theta = aff.theta(feats).flatten(2)[1, :, 7]  # row 7 of image 1 by hand: softmax_j(theta_7 . phi_j)
    phi = aff.phi(feats).flatten(2)[1]
    assert torch.allclose(a[1, 7], torch.softmax(theta @ phi, 0), atol=1e-6)


def test_cross_fusion_rows_sum_to_one_and_weights_are_per_pair_convex():
    torch.manual_seed(0)
    a_seg, a_sal = _row_stochastic(2, 12, 1), _row_stochastic(2, 12, 2)
    fusion = CrossTaskFusion(renormalize=True)
    fused = fusion(a_seg, a_sal)
    assert fused.shape == (2, 12, 12)
    assert torch.allclose(fused.sum(-1), torch.ones(2, 12), atol=1e-5)
    fusion.renormalize = False
    mixed = fusion(a_seg, a_sal)  # the official fusion: w1 A_seg + w2 A_sal with w1 + w2 = 1 per pair
    lo, hi = torch.minimum(a_seg, a_sal), torch.maximum(a_seg, a_sal)
    assert (mixed >= lo - 1e-6).all() and (mixed <= hi + 1e-6).all()
    assert torch.allclose(fused, mixed / mixed.sum(-1, keepdim=True), atol=1e-6)


def test_official_fusion_rows_need_not_sum_to_one():
    # why renormalize_cross exists: per-pair weights that favour each map where it is large
    fusion = CrossTaskFusion(renormalize=False)
    a_seg = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    a_sal = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    with torch.no_grad():  # conv3x3 off, conv1x1 bias = the stacked input's own channel decides: w = softmax(10 x)
        fusion.weights[0].weight.zero_()
        for c in range(2):
            fusion.weights[0].weight[c, c, 1, 1] = 10.0
        fusion.weights[2].weight.copy_(torch.eye(2)[:, :, None, None])
        fusion.weights[2].bias.zero_()
    assert fusion(a_seg, a_sal)[0, 0].sum() > 1.9  # ~[1, 1]: the row sums to 2
    fusion.renormalize = True
    assert torch.allclose(fusion(a_seg, a_sal).sum(-1), torch.ones(1, 2))


def test_refined_is_affinity_times_initial():
    a = _row_stochastic(2, 6, 3)
    maps = torch.randn(2, 3, 2, 3)
    out = propagate(a, maps)
    flat = maps.flatten(2)  # (N, C, hw)
    for n in range(2):
        for c in range(3):
            assert torch.allclose(out[n, c].flatten(), a[n] @ flat[n, c], atol=1e-5)


def _tiny_net(**kw) -> AuxSegNetwork:
    cfg = SimpleNamespace(name="test_resnet", weights="none", output_stride=8, frozen_stages=0, freeze_bn=False)
    torch.manual_seed(0)
    return AuxSegNetwork(cfg, num_classes=4, channels=8, rates=(1, 2, 3), **kw).eval()


def test_network_outputs_and_refinement():
    net = _tiny_net()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 40), with_affinity=True)
    h, w = out["init_seg"].shape[-2:]
    assert (h, w) == (4, 5) and out["cls"].shape == (2, 3) and out["cams"].shape == (2, 3, 4, 5)
    assert out["init_sal"].shape == (2, 1, 4, 5) and out["logits"].shape == (2, 4, 32, 40)
    assert out["affinity"].shape == (2, 20, 20)
    assert torch.allclose(out["affinity"].sum(-1), torch.ones(2, 20), atol=1e-5)
    assert torch.allclose(out["seg"], propagate(out["affinity"], out["init_seg"]), atol=1e-5)
    assert torch.allclose(out["sal"], propagate(out["affinity"], out["init_sal"]), atol=1e-5)
    # the backbone is all that is not new: new layers = everything else
    assert len(net.new_parameters()) == len(list(net.parameters())) - len(list(net.backbone.parameters()))


def test_ablations_drop_branches():
    seg_only = _tiny_net(saliency_task=False, cross_affinity=False)
    with torch.no_grad():
        out = seg_only(torch.randn(1, 3, 32, 32), with_affinity=True)
    assert "init_sal" not in out and out["affinity"] is None and torch.equal(out["seg"], out["init_seg"])
    assert seg_only.sal is None and seg_only.cross is None
    with_sal = _tiny_net(cross_affinity=False)
    with torch.no_grad():
        out = with_sal(torch.randn(1, 3, 32, 32))
    assert torch.equal(out["sal"], out["init_sal"]) and with_sal.cross is None


def test_affinity_memory_at_recipe_crops():
    assert affinity_bytes(41, 41, batch=4) == 4 * 1681**2 * 4  # voc12 / coco14: crop 321, OS 8
    assert affinity_bytes(12, 12, batch=16) == 16 * 144**2 * 4  # shapes: crop 96, OS 8
    assert affinity_bytes(20, 20, batch=8) < 6e6  # voc12-mini: crop 320, OS 16


# ---- the fusion rule and crf_for_sal against the official code ------------------------------------
# Expected values: xulianuwa/AuxSegNet @ 9f40a5d, tool/imutils.py::fusion_cam and crf_for_sal run on
# these inputs on the CPU (.cuda() patched to a no-op; pydensecrf 1.0rc3).

def test_fusion_rule_matches_official_fusion_cam_pixel_by_pixel():
    c1 = np.array([[0.9, 0.9, 0.1, 0.0], [0.3, 0.25, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], np.float32)
    c5 = np.array([[0.5, 0.95, 0.0, 0.0], [0.1, 0.3, 0.0, 0.0], [0.0, 0.0, 0.7, 0.1]], np.float32)
    sal = np.array([[0.5, 0.05, 0.07, 0.06], [0.9, 0.0, 0.061, 1.0], [0.2, 0.3, 0.059, 0.5]], np.float32)
    # official: cam (1, 20, 3, 4) with channels 0 and 4 as above, channel 7 = 0.99 everywhere but class 8
    # absent from the labels (masked out); labels {1, 5}
    official = [[1, 255, 255, 0], [1, 255, 255, 255], [255, 255, 255, 1]]
    got = fuse_cam_saliency(np.array([1, 5]), np.stack([c1, c5]), sal, 0.2, 0.06)
    assert got.dtype == np.uint8 and got.tolist() == official
    assert fuse_cam_saliency(np.array([1, 5]), np.stack([c1, c5]), (sal * 255).round().astype(np.uint8)).shape == (3, 4)


def test_fusion_rule_without_classes():
    sal = np.array([[0.0, 0.5]], np.float32)
    assert fuse_cam_saliency(np.zeros(0, np.int64), np.zeros((0, 1, 2), np.float32), sal).tolist() == [[0, 255]]


def test_saliency_crf_matches_official_crf_for_sal(one_torch_thread):
    from wsss.crf.presets import PRESETS

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    anno = rng.uniform(0, 1, (4, 5))
    official = np.array([
        [0.9885121583938599, 0.06988685578107834, 0.00034413376124575734, 0.9943743944168091, 0.6647006273269653],
        [0.01265308354049921, 0.43284106254577637, 0.9998303651809692, 0.9999513626098633, 0.03582107648253441],
        [0.8577494025230408, 0.01645132526755333, 0.91243577003479, 0.023297429084777832, 0.07480175048112869],
        [0.9998340606689453, 0.002277820371091366, 0.9529167413711548, 9.906946797855198e-05, 0.99941086769104]])
    got = saliency_crf(img, anno, PRESETS["auxsegnet_sal"], tau=1.05)
    np.testing.assert_allclose(got, official, atol=1e-5)


# ---- training data ----------------------------------------------------------------------------

def test_training_set_adds_binarised_saliency_and_padding_quirk(tmp_path):
    from wsss.config import load_recipe
    from wsss.data import build_dataset
    from wsss.data.transforms import SegmentationSet, train_augment
    from wsss.engine.auxsegnet import AuxSegSet

    cfg = load_recipe("configs/shapes_auxsegnet.yaml", [f"data.root={tmp_path}", "data.shapes.num_train=2",
                                                        "data.shapes.num_val=1", "data.shapes.image_size=32",
                                                        "seg.crop_size=48", "seg.scale_range=[1.0,1.0]", "seg.hflip=false"])
    ds = build_dataset(cfg.data, "train")
    seg_set = SegmentationSet(ds, "gt", train_augment(cfg.seg, with_masks=True))
    s = AuxSegSet(seg_set)[0]
    pad = ~s["roi"]
    assert s["saliency"].shape == (48, 48) and pad.sum() == 48 * 48 - 32 * 32  # padded bottom/right
    assert set(s["saliency"].unique().tolist()) <= {0.0, 1.0}
    expected = torch.from_numpy((ds.load_saliency(ds.ids[0]) > 0.5).astype(np.float32))
    assert torch.equal(s["saliency"][:32, :32], expected)
    assert not s["sal_valid"][pad].any() and (s["target"][pad] == 255).all()
    quirk = AuxSegSet(seg_set, pad_as_background=True)[0]  # official: padding is background and not salient
    assert quirk["sal_valid"].all() and (quirk["target"][pad] == 0).all() and (quirk["saliency"][pad] == 0).all()


# ---- end to end -------------------------------------------------------------------------------

TINY = ["data.shapes.num_train=12", "data.shapes.num_val=4", "data.shapes.image_size=32",
        "cam.backbone.name=test_resnet", "seg.encoder.name=test_resnet", "cam.max_steps=2", "seg.max_steps=2",
        "cam.batch_size=6", "seg.batch_size=6", "cam.crop_size=32", "seg.crop_size=32", "cam_infer.scales=[1.0]",
        "seg.auxsegnet.channels=8", "seg.auxsegnet.rates=[1,2,3]", "trainer.num_workers=0", "trainer.threads=1",
        "report.samples=1", "trainer.checkpoint_every_steps=1000"]


def _run(tmp: Path, *extra: str, command: str = "run") -> dict:
    from wsss.cli import main

    main([command, "configs/shapes_auxsegnet.yaml", f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY, *extra])
    return json.loads((tmp / "runs" / "shapes_auxsegnet" / "manifest.json").read_text())


@pytest.mark.slow
def test_auxsegnet_recipe_end_to_end_and_resume_by_round(tmp_path):
    manifest = _run(tmp_path, "seg.auxsegnet.rounds=2")
    run = tmp_path / "runs" / "shapes_auxsegnet"
    stages = manifest["stages"]
    assert [s for s, v in stages.items() if v["status"] == "done"] == \
        ["train_cam", "cam", "pseudo", "auxseg_rounds", "evaluate", "report"]
    assert stages["pseudo"]["metrics"]["method"] == "auxsegnet"
    rounds = stages["auxseg_rounds"]["metrics"]
    assert rounds["final_model"] == "seg_r2" and {"r1_train", "r2_train", "r1_pseudo_miou", "r2_pseudo_miou"} <= set(rounds)
    for k in (1, 2):
        assert len(list((run / f"pseudo_r{k}").glob("*.png"))) == 12
        assert len(list((run / f"pseudo_r{k}" / "saliency").glob("*.png"))) == 12
    assert 0.0 <= stages["evaluate"]["metrics"]["miou"] <= 1.0
    # evaluation used the last round's model
    from wsss.config import load_recipe
    from wsss.engine.rundir import RunDir
    from wsss.pipeline import final_model_dir

    rd = RunDir(load_recipe("configs/shapes_auxsegnet.yaml", [f"run.root={tmp_path / 'runs'}", "seg.auxsegnet.rounds=2"]))
    assert final_model_dir(rd) == run / "seg_r2"

    # resume by round: round 2 lost (killed during its training), round 1 is kept as it is
    r1 = (run / "seg_r1" / "model.safetensors").stat().st_mtime_ns
    (run / "seg_r2" / "model.safetensors").unlink()
    for p in (run / "pseudo_r2").glob("*.png"):
        p.unlink()
    manifest = _run(tmp_path, "seg.auxsegnet.rounds=2", command="auxseg-rounds")
    resumed = manifest["stages"]["auxseg_rounds"]["metrics"]
    assert resumed["r1_train"] == rounds["r1_train"]  # round 1 kept, its record carried over
    assert "r2_train" in resumed and (run / "seg_r2" / "model.safetensors").is_file()  # round 2 trained again
    assert (run / "seg_r1" / "model.safetensors").stat().st_mtime_ns == r1
    assert len(list((run / "pseudo_r2").glob("*.png"))) == 12

    # more rounds extend the run: rounds 1-2 kept, only round 3 trained, evaluation moves to it
    r2 = (run / "seg_r2" / "model.safetensors").stat().st_mtime_ns
    manifest = _run(tmp_path, "seg.auxsegnet.rounds=3")
    extended = manifest["stages"]["auxseg_rounds"]["metrics"]
    assert (run / "seg_r1" / "model.safetensors").stat().st_mtime_ns == r1
    assert (run / "seg_r2" / "model.safetensors").stat().st_mtime_ns == r2
    assert extended["final_model"] == "seg_r3" and extended["r2_train"] == resumed["r2_train"]
    assert manifest["stages"]["evaluate"]["config_hash"] != stages["evaluate"]["config_hash"]  # re-evaluated

    # another change to what the rounds depend on starts them afresh, later rounds included
    _run(tmp_path, "seg.auxsegnet.rounds=2", "seg.max_steps=3")
    assert (run / "seg_r3.old").is_dir() and not (run / "seg_r3").exists()
    assert (run / "seg_r1" / "model.safetensors").stat().st_mtime_ns != r1

    # the control: rounds without label updates train on the initial labels and write none
    rounds = _run(tmp_path, "seg.auxsegnet.rounds=2", "seg.auxsegnet.update_labels=false")["stages"]["auxseg_rounds"]
    assert rounds["status"] == "done" and not any(k.endswith("_pseudo_miou") for k in rounds["metrics"])
    assert not (run / "pseudo_r1").exists() and (run / "seg_r2" / "model.safetensors").is_file()


def test_an_option_added_at_its_earlier_behaviour_leaves_hashes_alone():
    from omegaconf import OmegaConf

    from wsss.config import LATER_OPTIONS, load_recipe, section_hash

    cfg = load_recipe("configs/shapes_auxsegnet.yaml")
    assert section_hash(cfg, ["seg"]) != \
        section_hash(load_recipe("configs/shapes_auxsegnet.yaml", ["seg.auxsegnet.update_labels=false"]), ["seg"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    hashed = section_hash(OmegaConf.create(plain), ["seg"])
    for key in LATER_OPTIONS:  # the recipe as it was before the options existed
        *parents, name = key.split(".")
        node = plain
        for p in parents:
            node = node[p]
        del node[name]
    assert section_hash(OmegaConf.create(plain), ["seg"]) == hashed


@pytest.mark.slow  # a CLI run (imports everything); seconds on an idle machine
def test_missing_saliency_is_a_one_line_error(make_voc, tmp_path, capsys):
    from wsss.cli import main

    voc = make_voc()
    with pytest.raises(SystemExit) as e:
        main(["run", "configs/voc12mini_auxsegnet.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={voc}",
              "run.stages=[pseudo]"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "needs saliency maps" in err and "data.saliency_dir" in err and "Traceback" not in err


def test_coco_reads_saliency_maps(tmp_path):
    from PIL import Image

    from test_data_coco import make_coco  # tests/ is on sys.path (pytest prepend mode)
    from wsss.data.coco import COCODataset
    from wsss.errors import DataError

    make_coco(tmp_path / "coco")
    ds = COCODataset(tmp_path / "coco", "train", cache_dir=tmp_path / "cache")
    assert not ds.has_saliency and ds.load_saliency(ds.ids[0]) is None
    sal_dir = tmp_path / "coco" / "sal"
    sal_dir.mkdir()
    h, w = ds.load_image(ds.ids[0]).shape[:2]
    for sid in ds.ids:
        Image.fromarray(np.full((h, w), 255, np.uint8)).save(sal_dir / f"{sid}.png")
    ds = COCODataset(tmp_path / "coco", "train", cache_dir=tmp_path / "cache", saliency_dir="sal")
    assert ds.has_saliency and ds.load(ds.ids[0])["saliency"].min() == 1.0
    with pytest.raises(DataError, match="data.saliency_dir"):
        COCODataset(tmp_path / "coco", "train", cache_dir=tmp_path / "cache", saliency_dir="nowhere")


def test_inference_does_not_pad_the_image():
    # padded positions would enter every non-local affinity; the refined head sees the image as it is
    from wsss.config import BackboneConfig, SegConfig
    from wsss.engine.auxsegnet import AuxSegNet, AuxSegNetOptions
    from wsss.engine.inference import segment_probs

    seg = SegConfig(encoder=BackboneConfig(name="test_resnet", output_stride=8, channels_last=False))
    torch.manual_seed(0)
    method = AuxSegNet(seg, 4, ["bg", "a", "b", "c"], None, AuxSegNetOptions(channels=8, rates=[1, 2, 3])).eval()
    seen = []
    logits = method.logits
    method.logits = lambda x: seen.append(tuple(x.shape)) or logits(x)
    probs = segment_probs(method, np.zeros((40, 36, 3), np.uint8), scales=(1.0,), flip=True)
    assert seen == [(2, 3, 40, 36)] and probs.shape == (4, 40, 36)
    assert torch.allclose(probs.sum(0), torch.ones(40, 36), atol=1e-5)
