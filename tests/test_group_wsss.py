"""Group-WSSS on tiny tensors: sampler, co-attention, graph dropout, graph network, loss, map accumulation,
the saliency-fusion pseudo masks and a tiny `wsss run configs/shapes_group.yaml`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam.accumulate import AccumulatedMaps
from wsss.cam.group_wsss import GroupOptions, accumulate, group_loss
from wsss.config import BackboneConfig
from wsss.data.group_sampler import GroupBatchSampler, draw_partners
from wsss.models.group_graph import CoAttention, GraphDropout, GroupGraph, GroupNet
from wsss.pseudo.saliency_fusion import SaliencyFusionOptions, saliency_fusion_labels

# 12 images, 3 classes: label vectors with several exact matches, and one image (index 11) whose vector is unique
LABELS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0],
                   [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 1]], np.float32)


# ---- sampler -----------------------------------------------------------------------------------

def test_partners_share_labels_exactly_or_fall_back_to_one_class():
    sampler = GroupBatchSampler(LABELS, group_size=3, batch_size=2, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len(batch) % 3 == 0
            for g in range(0, len(batch), 3):
                anchor, partners = batch[g], batch[g + 1 : g + 3]
                assert anchor not in partners
                if anchor == 11:  # unique vector: fallback to an image with one of its classes
                    assert all((LABELS[p] * LABELS[anchor]).sum() >= 1 for p in partners)
                else:
                    assert all((LABELS[p] == LABELS[anchor]).all() for p in partners)


def test_fallback_is_bounded_and_never_loops():
    labels = np.eye(4, dtype=np.float32)  # nobody shares a class with anyone: the anchor itself is the last resort
    assert draw_partners(labels, 2, 3, np.random.default_rng(0), max_tries=5) == [2, 2, 2]


def test_sampler_is_deterministic_per_seed_and_reshuffles_per_epoch():
    a, b = GroupBatchSampler(LABELS, 3, 2, seed=7), GroupBatchSampler(LABELS, 3, 2, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(a.anchors()) == list(range(12))  # every image is an anchor once per epoch
    assert a.sampler.epoch == 1  # Lightning calls batch_sampler.sampler.set_epoch


def test_ranks_get_disjoint_anchors_and_the_same_groups():
    one = GroupBatchSampler(LABELS, 3, 1, seed=3, world_size=1, rank=0)
    ranks = [GroupBatchSampler(LABELS, 3, 1, seed=3, world_size=2, rank=r) for r in (0, 1)]
    a0, a1 = ranks[0].anchors(), ranks[1].anchors()
    assert not set(a0) & set(a1) and sorted(a0 + a1) == list(range(12))
    groups = {b[0]: b for r in ranks for b in r}
    assert all(groups[b[0]] == b for b in one)  # a group depends on (seed, epoch, anchor) only


def test_flat_batches_collate_to_groups():
    ds = [{"x": torch.full((2,), float(i))} for i in range(12)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=GroupBatchSampler(LABELS, 4, 2, seed=0))
    batch = next(iter(loader))
    assert batch["x"].shape == (8, 2)  # (B * N, ...)


# ---- graph network -----------------------------------------------------------------------------

def test_coattention_softmax_runs_over_the_partners_positions():
    torch.manual_seed(0)
    att = CoAttention(channels=4, proj_channels=2)
    h_i, h_j = torch.randn(2, 4, 3, 4), torch.randn(2, 4, 2, 5)  # different sizes: rows and columns can't be confused
    w = att.attention(h_i, h_j)
    assert w.shape == (2, 12, 10)
    torch.testing.assert_close(w.sum(dim=2), torch.ones(2, 12))
    # the official formula: A = a^T b, B = softmax(A^T, dim=1), message = h_j B
    a, b = att.proj_a(h_i).flatten(2), att.proj_b(h_j).flatten(2)
    ref_b = torch.softmax((a.transpose(1, 2) @ b).transpose(1, 2), dim=1)
    ref = (h_j.flatten(2) @ ref_b).view(2, 4, 3, 4)
    ref = ref * torch.sigmoid(att.gate(ref))
    torch.testing.assert_close(att(h_i, h_j), ref)
    # a partner that is constant over its positions sends exactly that constant (before the gate)
    const = torch.ones(1, 4, 2, 5) * torch.arange(4.0).view(1, 4, 1, 1)
    h_i = torch.randn(1, 4, 3, 4)
    ungated = (const.flatten(2) @ att.attention(h_i, const).transpose(1, 2)).view(1, 4, 3, 4)
    torch.testing.assert_close(ungated, torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 3, 4))
    torch.testing.assert_close(att(h_i, const), ungated * torch.sigmoid(att.gate(ungated)))


def test_graph_dropout_branches_and_eval():
    h = torch.tensor([[[[1.0, 2.0], [3.0, 10.0]]]])  # (1, 1, 2, 2): mean over channels = h
    gdl = GraphDropout(drop_rate=0.8, drop_threshold=0.7).train()
    dropped = gdl(h, use_drop=True)  # positions >= 0.7 * max (only the 10) are halved
    torch.testing.assert_close(dropped, torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]]))
    torch.testing.assert_close(gdl(h, use_drop=False), (h * torch.sigmoid(h) + h) / 2)
    torch.manual_seed(0)
    always = GraphDropout(drop_rate=1.0).train()
    never = GraphDropout(drop_rate=0.0).train()
    torch.testing.assert_close(always(h), dropped)
    torch.testing.assert_close(never(h), (h * torch.sigmoid(h) + h) / 2)
    assert torch.equal(gdl.eval()(h), h)  # off at evaluation by default
    official = GraphDropout(drop_rate=1.0, at_eval=True).eval()
    torch.testing.assert_close(official(h), dropped)  # the official layer: stochastic in eval mode too


def _backbone(**kw) -> BackboneConfig:
    return replace(BackboneConfig(name="test_resnet", weights="none", output_stride=8, channels_last=False), **kw)


@pytest.mark.parametrize("node", ["cams", "features"])
def test_group_net_shapes(node, one_torch_thread):
    torch.manual_seed(0)
    net = GroupNet(_backbone(), num_classes=5, group_size=3, steps=2, node=node, head_convs=1, head_channels=8,
                   dropout=GraphDropout())
    out = net.forward_group(torch.randn(6, 3, 32, 32))  # two groups of three
    assert out["cams0"].shape == out["camsT"].shape == (2, 3, 5, 4, 4)
    assert out["logits0"].shape == out["logitsT"].shape == (2, 3, 5)
    torch.testing.assert_close(out["logits0"], out["cams0"].mean(dim=(3, 4)))
    single = net.eval()(torch.randn(2, 3, 32, 32))
    assert single["cams"].shape == (2, 5, 4, 4) and single["logits"].shape == (2, 5)


def test_graph_rounds_are_synchronous_with_shared_weights():
    torch.manual_seed(0)
    graph = GroupGraph(channels=4, group_size=3, steps=2).eval()
    h0 = torch.randn(1, 3, 4, 3, 3)
    manual = graph.step(graph.step(h0))
    torch.testing.assert_close(graph(h0), manual)
    # node 0's first update uses the round-0 states of nodes 1 and 2 (not node 1's already updated state)
    m = [graph.message(h0[:, 0], h0[:, j]) for j in (1, 2)]
    ref = graph.update(graph.fuse(torch.cat(m, 1)), h0[:, 0])
    torch.testing.assert_close(graph.step(h0)[:, 0], ref)
    assert torch.equal(GroupGraph(4, 3, steps=0)(h0), h0)


def test_group_loss_uses_the_official_weights():
    torch.manual_seed(0)
    out = {"logits0": torch.randn(1, 3, 4), "logitsT": torch.randn(1, 3, 4)}
    labels = torch.tensor([[1, 0, 1, 0]] * 3, dtype=torch.float32)
    loss, _ = group_loss(out, labels)

    def per(logits: torch.Tensor) -> torch.Tensor:  # sum over the group's nodes
        return sum(F.multilabel_soft_margin_loss(logits[0, i : i + 1], labels[i : i + 1]) for i in range(3))

    torch.testing.assert_close(loss, (0.4 * per(out["logits0"]) + per(out["logitsT"])) / 6)


# ---- map accumulation ----------------------------------------------------------------------------

def _mined(value: float, prob: float, sid: str = "a") -> dict:
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0] = torch.tensor([[value, 1.0], [0.0, 0.0]])  # class 1 (label index 1), max 1 after scaling
    return {"ids": [sid], "labels": torch.tensor([[1.0, 0.0]]), "maps": maps, "probs": torch.tensor([[prob, 0.9]])}


def test_accumulation_is_a_running_maximum_that_survives_a_resume(tmp_path):
    accumulate(AccumulatedMaps(tmp_path), _mined(0.2, 0.9))
    accumulate(AccumulatedMaps(tmp_path), _mined(0.6, 0.9))  # a fresh object on the same dir = after a kill
    accumulate(AccumulatedMaps(tmp_path), _mined(0.4, 0.9))
    maps = AccumulatedMaps(tmp_path).read("a")
    assert list(maps) == [1]  # only the image's labelled class
    np.testing.assert_allclose(maps[1], [[0.6, 1.0], [0.0, 0.0]], atol=1e-3)
    assert AccumulatedMaps(tmp_path).ids() == ["a"]


def test_accumulation_gate_and_last_epoch_rule(tmp_path):
    store = AccumulatedMaps(tmp_path)
    accumulate(store, _mined(0.5, 0.05))  # sigmoid score below 0.1: skipped
    assert store.read("a") == {}
    accumulate(store, _mined(0.5, 0.05), last_epoch=True)  # last epoch: a missing map is written anyway
    np.testing.assert_allclose(store.read("a")[1][0, 0], 0.5, atol=1e-3)
    accumulate(store, _mined(0.9, 0.05), last_epoch=True)  # ... but an existing one is still gated
    np.testing.assert_allclose(store.read("a")[1][0, 0], 0.5, atol=1e-3)


def test_accumulated_cams_are_resized_to_the_image(tmp_path):
    from wsss.stages.accumulated_cams import image_cams

    store = AccumulatedMaps(tmp_path)
    store.write("a", {2: np.ones((4, 4), np.float32)})
    classes, maps, missing = image_cams(store, "a", np.array([0, 1, 1], np.float32), (8, 6))
    assert classes.tolist() == [2, 3] and maps.shape == (2, 8, 6) and missing == 1
    assert np.allclose(maps[0], 1.0) and np.allclose(maps[1], 0.0)


# ---- pseudo masks ---------------------------------------------------------------------------------

def test_saliency_fusion_follows_gen_labels():
    sal = np.array([[0.0, 0.0, 1.0, 1.0],
                    [0.0, 0.5, 1.0, 1.0]], np.float32)  # 0..1; 0.5 = 127 >= 32: uncertain background
    cams = np.array([[[0.0, 0.0, 1.0, 0.95], [0.0, 0.1, 0.2, 0.95]],   # class 3
                     [[0.0, 0.0, 0.1, 0.95], [0.0, 0.0, 0.9, 0.0]]], np.float32)  # class 5
    labels = saliency_fusion_labels(np.array([3, 5]), cams, sal)
    expected = np.array([[0, 0, 3, 255],      # (0, 3): both maps > 0.9 -> conflict
                         [0, 255, 5, 3]], np.uint8)  # (1, 1): background by argmax, saliency 127 -> ignore
    np.testing.assert_array_equal(labels, expected)
    empty = saliency_fusion_labels(np.array([3]), np.zeros((1, 2, 4), np.float32), np.zeros((2, 4), np.float32),
                                   SaliencyFusionOptions(min_fg_fraction=0.01))
    assert (empty == 255).all()  # no foreground at all: the image is ignored


# ---- end to end ---------------------------------------------------------------------------------

TINY = ["data.shapes.num_train=12", "data.shapes.num_val=4", "data.shapes.image_size=32",
        "cam.backbone.name=test_resnet", "seg.encoder.name=test_resnet", "cam.epochs=2", "cam.batch_size=2",
        "cam.group.size=32", "cam.group.head_channels=8", "cam.group.steps=1", "cam.group.accumulate_from_epoch=0",
        "seg.max_steps=2", "seg.batch_size=4", "seg.crop_size=32", "trainer.num_workers=0", "trainer.threads=1",
        "report.samples=2", "trainer.checkpoint_every_steps=5"]


@pytest.mark.slow
def test_shapes_group_recipe_runs_end_to_end(tmp_path):
    from wsss.cam.store import read_cams
    from wsss.cli import main

    main(["run", "configs/shapes_group.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", *TINY])
    run = tmp_path / "runs" / "shapes_group"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert [s for s, v in stages.items() if v["status"] == "done"] == \
        ["train_cam", "accumulated_cams", "pseudo", "train_seg", "evaluate", "report"]
    assert stages["train_cam"]["metrics"]["steps"] == 2 * 6  # 12 anchors / 2 groups per step, 2 epochs
    assert len(AccumulatedMaps(run / "cam" / "accumulated").ids()) == 12  # every image was an anchor
    assert stages["accumulated_cams"]["metrics"]["missing_maps"] == 0
    classes, maps = read_cams(next((run / "cams").glob("*.npz")))
    assert maps.shape[1:] == (32, 32) and len(classes) == maps.shape[0]
    assert stages["pseudo"]["metrics"]["method"] == "saliency_fusion"
    assert 0.0 <= stages["evaluate"]["metrics"]["miou"] <= 1.0


@pytest.mark.slow
def test_voc12mini_group_recipe_on_real_images(voc_mini: Path, tmp_path: Path):
    """The CPU recipe on 4 real VOC images with stand-in saliency maps (the saliency stage's output in practice)."""
    from PIL import Image

    from wsss.cli import main
    from wsss.config import load_recipe
    from wsss.data import build_dataset

    cfg = load_recipe("configs/voc12mini_group.yaml", [f"data.root={voc_mini}", "data.max_images=4"])
    ds = build_dataset(cfg.data, cfg.data.train_split)
    sal = tmp_path / "saliency"
    sal.mkdir()
    for sid in ds.ids:
        h, w = ds.load_image(sid).shape[:2]
        blob = np.zeros((h, w), np.uint8)
        blob[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
        Image.fromarray(blob).save(sal / f"{sid}.png")
    main(["run", "configs/voc12mini_group.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={voc_mini}",
          "data.max_images=4", f"data.saliency_dir={sal}", "cam.backbone.name=test_resnet", "cam.backbone.weights=none",
          "seg.encoder.name=test_resnet", "seg.encoder.weights=none", "cam.epochs=2", "cam.group.size=64",
          "cam.group.head_channels=8", "cam.group.accumulate_from_epoch=0", "seg.max_steps=2", "seg.batch_size=2",
          "seg.crop_size=64", "trainer.num_workers=0", "trainer.threads=1", "report.samples=1"])
    stages = json.loads((tmp_path / "runs" / "voc12mini_group" / "manifest.json").read_text())["stages"]
    assert all(v["status"] == "done" for v in stages.values()) and stages["accumulated_cams"]["metrics"]["missing_maps"] == 0
    assert stages["pseudo"]["metrics"]["method"] == "saliency_fusion"
    assert len(list((tmp_path / "runs" / "voc12mini_group" / "pseudo").glob("*.png"))) == 4


def test_bad_group_options_are_config_errors_when_the_recipe_loads():
    from wsss.config import load_recipe
    from wsss.errors import ConfigError

    for bad, needle in ((["cam.group.node=pixels"], "cam.group.node: 'pixels' is not one of cams, features"),
                        (["cam.group.group_size=0"], "cam.group: group_size (0)"),
                        (["cam.group.color_jitter=[0.3]"], "cam.group.color_jitter")):
        with pytest.raises(ConfigError) as err:
            load_recipe("configs/shapes_group.yaml", bad)
        assert needle in str(err.value)
    with pytest.raises(ConfigError, match="cam.group.aggregate"):
        GroupOptions(aggregate="sum")  # the options object checks itself, wherever it is built


def test_pseudo_masks_depend_on_the_accumulated_maps(tmp_path):
    """With accumulated_cams in place of cam, a change of the CAM training makes the pseudo masks stale."""
    from wsss.config import load_recipe
    from wsss.engine.rundir import RunDir

    def pseudo_hash(*extra: str) -> str:
        return RunDir(load_recipe("configs/shapes_group.yaml", [f"run.root={tmp_path}", *extra])).stage_hash("pseudo")

    assert pseudo_hash() == pseudo_hash()
    assert pseudo_hash("cam.group.steps=1") != pseudo_hash()
    assert pseudo_hash("run.stages=[train_cam, cam, pseudo]") != pseudo_hash()


def test_cam_stage_sets_aside_maps_that_accumulated_cams_wrote(tmp_path):
    """Switching a run from accumulated maps to multi-scale inference must not resume from the accumulated files."""
    from wsss.config import load_recipe
    from wsss.engine.rundir import RunDir

    group = RunDir(load_recipe("configs/shapes_group.yaml", [f"run.root={tmp_path}"])).prepare()
    cams = group.sub("cams")
    cams.mkdir()
    (cams / "img.npz").write_bytes(b"accumulated")
    group.update_stage("accumulated_cams", status="done", config_hash=group.stage_hash("accumulated_cams"))
    msinfer = RunDir(load_recipe("configs/shapes_group.yaml", [f"run.root={tmp_path}",
                                                               "run.stages=[train_cam, cam, pseudo]"]))
    msinfer.reset_outputs_if_stale("cam", [msinfer.sub("cams")])
    assert not cams.exists() and (tmp_path / group.path.name / "cams.old" / "img.npz").read_bytes() == b"accumulated"
