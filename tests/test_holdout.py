"""The convergence protocol (docs/protocol.md): a fixed held-out part of the train split, early stopping
on its mIoU, and its best weights exported as the model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wsss.config import load_recipe
from wsss.data.splits import holdout_count, split_holdout
from wsss.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
VOC_LIKE = [f"2008_{i:06d}" for i in range(330)]  # as many ids as voc12-mini's train split


# ---- the split -------------------------------------------------------------------------------------


def test_split_is_disjoint_complete_right_size_and_keeps_the_order():
    kept, held = split_holdout(VOC_LIKE, 0.2)
    assert len(held) == 66 and len(kept) == 264
    assert not set(kept) & set(held) and set(kept) | set(held) == set(VOC_LIKE)
    assert kept == [s for s in VOC_LIKE if s in set(kept)] and held == [s for s in VOC_LIKE if s in set(held)]
    assert split_holdout(VOC_LIKE, 0.2) == (kept, held)  # deterministic


def test_split_does_not_depend_on_the_order_of_the_ids():
    held = set(split_holdout(VOC_LIKE, 0.2)[1])
    for seed in range(3):
        ids = VOC_LIKE[:]
        random.Random(seed).shuffle(ids)
        assert set(split_holdout(ids, 0.2)[1]) == held


def test_split_is_the_same_in_every_process():
    """No RNG and no str hash (randomised per process by PYTHONHASHSEED) decides it; seeds are not an input."""
    code = ("import random, numpy; random.seed({s}); numpy.random.seed({s})\n"
            "from wsss.data.splits import split_holdout\n"
            "print(','.join(split_holdout([f'img{{i}}' for i in range(50)], 0.3)[1]))")
    outs = set()
    for seed in (0, 1):
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, "-c", code.format(s=seed)], env=env, capture_output=True, text=True,
                             check=True)
        outs.add(res.stdout.strip())
    assert len(outs) == 1 and len(next(iter(outs)).split(",")) == 15


def test_holdout_count_rounds_half_up_and_leaves_both_parts_non_empty():
    assert holdout_count(330, 0.2) == 66
    assert holdout_count(10, 0.25) == 3  # 2.5 rounds up (Python's round() would give 2)
    assert holdout_count(3, 0.2) == 1  # 0.6 -> 1; and never 0 when a part is asked for
    assert holdout_count(2, 0.9) == 1  # at least one image still trains
    assert holdout_count(5, 0.0) == 0 and split_holdout(["a", "b"], 0.0) == (["a", "b"], [])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            holdout_count(10, bad)
    with pytest.raises(ValueError):
        holdout_count(1, 0.5)


def test_select_is_a_copy_with_only_the_given_ids(make_voc):
    from wsss.data.voc import VOCDataset

    voc = make_voc(masks={"2007_000001": (1,), "2007_000002": (12,), "2007_000003": (3,)})
    ds = VOCDataset(voc, "train")
    part = ds.select(["2007_000003", "2007_000001"])
    assert part.ids == ["2007_000003", "2007_000001"] and len(ds) == 3
    assert part.load_labels("2007_000003")[2] == 1
    with pytest.raises(DataError, match="not in this data set"):
        ds.select(["nope"])


# ---- recipe keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, needle", [
    (["seg.convergence.holdout=1.0"], "seg.convergence.holdout: a fraction of the train split in [0, 1)"),
    (["seg.convergence.holdout=-0.2"], "seg.convergence.holdout"),
    (["seg.convergence.patience=-1"], "seg.convergence.patience: epochs without improvement (0 = never stop early), >= 0, got -1"),
    (["seg.convergence.holdout=0.2", "cyclic.rounds=1", "cyclic.selection=best_val_uses_gt"],
     "cyclic.selection: best_val_uses_gt selects on val ground truth"),
    (["seg.seed=-2"], "seg.seed: a seed, or -1 for trainer.seed, >= -1, got -2"),
    (["cyclic.rounds=-1"], "cyclic.rounds: the number of cyclic pseudo-mask rounds (0 = off), >= 0, got -1"),
    (["seg.convergence.keep=final"], "seg.convergence.keep"),
])
def test_bad_protocol_values_are_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_protocol_defaults_are_off_and_voc12mini_recipes_turn_it_on():
    cfg = load_recipe(None)
    assert (cfg.seg.convergence.holdout, cfg.seg.convergence.patience) == (0.0, 3)
    mini = load_recipe(REPO / "configs" / "voc12mini_cam.yaml", [f"data.root={REPO}"])
    # the protocol's second version: a fixed poly schedule to 0, the last weights kept (docs/protocol.md)
    assert mini.seg.convergence.holdout == 0.2 and (mini.seg.convergence.patience, mini.seg.convergence.keep) == (0, "last")
    assert mini.seg.epochs >= 20 and mini.seg.val_every <= 1


def test_the_protocol_enters_stage_hashes_only_when_on():
    """Off, its keys are left out of the hashes: runs from before the protocol existed stay valid."""
    from wsss.config import section_hash

    def seg_hash(*overrides: str) -> str:
        return section_hash(load_recipe(None, list(overrides)), ["seg"])

    assert seg_hash() == seg_hash("seg.convergence.patience=7")
    assert seg_hash("seg.convergence.holdout=0.2") != seg_hash("seg.convergence.holdout=0.2", "seg.convergence.patience=7")
    assert seg_hash() != seg_hash("seg.convergence.holdout=0.2")
    # keep: best (the only behaviour before the key existed) stays out of the hash; last enters it
    on = "seg.convergence.holdout=0.2"
    assert seg_hash(on) == seg_hash(on, "seg.convergence.keep=best") != seg_hash(on, "seg.convergence.keep=last")
    # seg.seed (segmenter seeds that share CAMs) enters only when set
    assert seg_hash() != seg_hash("seg.seed=0") != seg_hash("seg.seed=1")


def test_moving_the_feature_cache_does_not_change_the_segmenter_hash():
    """The cache root is where features live (entries are keyed by content); its scales are what they are."""
    from wsss.config import section_hash

    def seg_hash(*overrides: str) -> str:
        return section_hash(load_recipe(None, list(overrides)), ["seg", "data"])

    assert seg_hash() == seg_hash("seg.feature_cache.root=/elsewhere/fcache")
    assert seg_hash() != seg_hash("seg.feature_cache.scales=[1.0]")


def test_more_rounds_keep_the_outputs_hash_but_not_the_stage_hash(tmp_path):
    from wsss.config import load_recipe
    from wsss.engine.rundir import RunDir

    def hashes(*overrides: str) -> tuple[str, str, str]:
        rd = RunDir(load_recipe("configs/shapes_pmm.yaml", [f"run.root={tmp_path}", *overrides]))
        return rd.stage_hash("cyclic"), rd.outputs_hash("cyclic"), rd.stage_hash("evaluate")

    one, two, lr = hashes("cyclic.rounds=1"), hashes("cyclic.rounds=2"), hashes("cyclic.rounds=2", "seg.lr=0.5")
    assert one[1] == two[1] and one[0] != two[0]  # the rounds made stay valid; the stage still reruns
    assert one[2] != two[2]  # evaluation moves to the new last round
    assert lr[1] != two[1]  # anything else the rounds read starts them afresh


# ---- early stopping and selection (the callback alone) ------------------------------------------------


def _fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(callback_metrics={}, sanity_checking=False, current_epoch=0, global_step=0,
                           is_global_zero=False, should_stop=False,
                           strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d))


def _validate(keep, trainer, scores) -> list[bool]:
    """Feed one held-out mIoU per epoch; returns should_stop after each."""
    stops = []
    for epoch, score in enumerate(scores):
        trainer.current_epoch, trainer.global_step = epoch, 10 * (epoch + 1)
        trainer.callback_metrics = {"holdout/miou": torch.tensor(score)}
        keep.on_validation_end(trainer, None)
        stops.append(trainer.should_stop)
    return stops


def test_keep_best_stops_after_patience_epochs_without_improvement(tmp_path):
    from wsss.engine.trainer import KeepBestVal

    keep = KeepBestVal(tmp_path, None, [], "holdout/miou", "best_holdout", patience=2)
    trainer = _fake_trainer()
    stops = _validate(keep, trainer, [0.1, 0.3, 0.3, 0.2])  # equal is no improvement
    assert stops == [False, False, False, True]
    assert (keep.best, keep.epoch, keep.step, keep.stopped_epoch) == (pytest.approx(0.3), 2, 20, 4)
    assert keep.out == tmp_path / "best_holdout"
    # a run resumed from a checkpoint saved after the decision trains no further
    resumed, fresh = KeepBestVal(tmp_path, None, [], "holdout/miou", "best_holdout", 2), _fake_trainer()
    resumed.load_state_dict(keep.state_dict())
    resumed.on_train_start(fresh, None)
    assert fresh.should_stop and resumed.epoch == 2


def test_keep_best_val_without_patience_never_stops_and_reads_old_checkpoints(tmp_path):
    """PMM's best-val selection: monitor val/miou, no early stopping, checkpoints of before the protocol load."""
    from wsss.engine.trainer import KeepBestVal

    keep = KeepBestVal(tmp_path, None, [])
    trainer = _fake_trainer()
    trainer.callback_metrics = {"val/miou": 0.5}
    keep.on_validation_end(trainer, None)
    for epoch in range(1, 6):
        trainer.current_epoch, trainer.callback_metrics = epoch, {"val/miou": 0.4}
        keep.on_validation_end(trainer, None)
    assert not trainer.should_stop and keep.best == 0.5 and keep.out == tmp_path / "best_val"
    keep.load_state_dict({"best": 0.7, "step": 3})
    assert (keep.best, keep.step, keep.epoch, keep.stopped_epoch) == (0.7, 3, 0, 0)


# ---- train_segmenter end to end on tiny shapes ---------------------------------------------------------

# FPN's decoder has GroupNorm and the encoder's BatchNorm is frozen, so with lr 0 the network does not
# change at all: the held-out mIoU cannot improve after the first epoch.
RECIPE = """\
run: {stages: [train_seg]}
data: {dataset: shapes, shapes: {num_train: 24, num_val: 8, image_size: 64}}
seg:
  labels: gt
  arch: fpn
  encoder: {name: test_resnet, weights: none, output_stride: 16, freeze_bn: true}
  batch_size: 8
  crop_size: 64
  epochs: 10
  lr: 0.0
  convergence: {holdout: 0.25, patience: 2}
trainer: {num_workers: 0, threads: 1, checkpoint_every_steps: 1}
"""


def _recipe(tmp: Path) -> list[str]:
    (tmp / "r.yaml").write_text(RECIPE)
    return [str(tmp / "r.yaml"), f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}"]


def _cfg(tmp: Path):
    path, *overrides = _recipe(tmp)
    return load_recipe(path, overrides)


def _train_seg(tmp: Path, *extra: str) -> dict:
    from wsss.cli import main

    main(["train-seg", *_recipe(tmp), *extra])
    return json.loads((tmp / "runs" / "r" / "manifest.json").read_text())["stages"]["train_seg"]["metrics"]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> tuple[Path, dict, set, set]:
    """The lr=0 run, recording which ids the training and the validation loaders read."""
    from wsss.data import transforms

    tmp = tmp_path_factory.mktemp("holdout")
    trained, validated = set(), set()
    seg_item, inf_item = transforms.SegmentationSet.__getitem__, transforms.InferenceSet.__getitem__

    def seg_spy(self, i):
        trained.add(self.base.ids[i])
        return seg_item(self, i)

    def inf_spy(self, i):
        validated.add(self.ids[i])
        return inf_item(self, i)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transforms.SegmentationSet, "__getitem__", seg_spy)
        mp.setattr(transforms.InferenceSet, "__getitem__", inf_spy)
        metrics = _train_seg(tmp)
    return tmp, metrics, trained, validated


def test_held_out_images_never_train_and_are_what_is_validated(flat_run):
    tmp, metrics, trained, validated = flat_run
    held = (tmp / "runs" / "r" / "seg" / "holdout.txt").read_text().split()
    from wsss.stages.common import split_dataset

    ids = split_dataset(_cfg(tmp), "train").ids
    assert held == split_holdout(ids, 0.25)[1] and len(held) == 6
    assert validated == set(held) and trained == set(ids) - set(held)


def test_a_run_that_cannot_improve_stops_early_and_exports_the_best_weights(flat_run):
    tmp, metrics, _, _ = flat_run
    assert metrics["images"] == 18 and metrics["holdout_images"] == 6
    assert (metrics["holdout_best_epoch"], metrics["stopped_at_epoch"], metrics["stopped_early"]) == (1, 3, True)
    assert metrics["holdout_best_step"] == 2 and metrics["steps"] == 6  # 2 steps an epoch, 3 of the 10 epochs
    assert 0 <= metrics["holdout_best_miou"] <= 1
    seg = tmp / "runs" / "r" / "seg"
    model, best = load_file(seg / "model.safetensors"), load_file(seg / "best_holdout" / "model.safetensors")
    assert model.keys() == best.keys() and all(torch.equal(model[k], best[k]) for k in model)


def test_the_exported_model_scores_the_best_held_out_miou_of_a_learning_run(tmp_path):
    """lr > 0: the exported weights are the epoch with the highest logged held-out mIoU, and scoring them
    again on the held-out images gives that number."""
    import csv

    metrics = _train_seg(tmp_path, "seg.lr=0.05", "seg.epochs=4", "seg.convergence.patience=1")
    seg = tmp_path / "runs" / "r" / "seg"
    rows = [r for r in csv.DictReader((seg / "logs" / "metrics.csv").open()) if r.get("holdout/miou")]
    curve = [float(r["holdout/miou"]) for r in rows]
    assert len(curve) == metrics["stopped_at_epoch"] and "val/miou" not in rows[0]
    assert metrics["holdout_best_epoch"] == 1 + int(np.argmax(curve))
    assert metrics["holdout_best_miou"] == round(max(curve), 4)
    assert metrics["stopped_early"] == (metrics["stopped_at_epoch"] < 4)
    assert metrics["holdout_last_miou"] == round(curve[-1], 4) and metrics["kept"] == "best"
    assert _held_out_miou(tmp_path, seg) == pytest.approx(metrics["holdout_best_miou"], abs=1e-4)


def test_keep_last_exports_the_last_epoch_whatever_the_held_out_curve_says(tmp_path):
    """seg.convergence.keep=last, patience 0: all epochs train, the model is the last epoch's weights (scoring
    them gives the last logged held-out mIoU), and the best held-out epoch is still recorded."""
    import csv

    metrics = _train_seg(tmp_path, "seg.lr=0.05", "seg.epochs=4", "seg.convergence.patience=0",
                         "seg.convergence.keep=last")
    seg = tmp_path / "runs" / "r" / "seg"
    curve = [float(r["holdout/miou"]) for r in csv.DictReader((seg / "logs" / "metrics.csv").open()) if r.get("holdout/miou")]
    assert len(curve) == metrics["stopped_at_epoch"] == 4 and not metrics["stopped_early"]
    assert (metrics["kept"], metrics["holdout_last_miou"]) == ("last", round(curve[-1], 4))
    assert metrics["holdout_best_miou"] == round(max(curve), 4)
    assert _held_out_miou(tmp_path, seg) == pytest.approx(curve[-1], abs=1e-4)
    model, best = load_file(seg / "model.safetensors"), load_file(seg / "best_holdout" / "model.safetensors")
    assert any(not torch.equal(model[k], best[k]) for k in model) == (metrics["holdout_best_epoch"] != 4)


def _held_out_miou(tmp_path: Path, seg: Path) -> float:
    """The exported model's mIoU on the held-out images, scored as validation_step scores."""
    from wsss.metrics import ConfusionMatrix
    from wsss.stages.common import load_predictor, split_dataset

    cfg = _cfg(tmp_path)
    ds = split_dataset(cfg, "train")
    predictor = load_predictor(cfg, seg, ds.class_names, torch.device("cpu"))
    cm = ConfusionMatrix(ds.num_classes)
    for sid in (seg / "holdout.txt").read_text().split():
        sample = ds.load(sid, ("image", "mask"))
        cm.update(predictor.probs(sample["image"]).argmax(0), sample["mask"])
    return cm.compute(ds.class_names).miou


# slowed renames (0.3 s a checkpoint) leave time to kill it between epoch 1 and the end
SLOW_CHILD = ("import os, sys, time\n_replace = os.replace\n"
              "def slow(a, b, **kw):\n    time.sleep(float(os.environ['WSSS_SLOW'])); _replace(a, b, **kw)\n"
              "os.replace = slow\nfrom wsss.cli import main\nmain(sys.argv[1:])\n")


@pytest.mark.slow
def test_sigkill_after_the_best_epoch_then_rerun_remembers_it(tmp_path):
    """Killed after epoch 1's validation (the best, as lr is 0): the resumed run keeps epoch 1 as the best and
    stops two epochs later, as an uninterrupted run does (a run that forgot would pick epoch 2 and stop at 4)."""
    args = ["train-seg", *_recipe(tmp_path)]
    last = tmp_path / "runs" / "r" / "seg" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WSSS_SLOW": "0.3"}
    log = tmp_path / "child.log"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *args], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)

    def after_first_validation() -> bool:
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not there yet
            return False
        return ckpt["global_step"] >= 3  # step 3 is in epoch 2: its checkpoint holds epoch 1's validation

    deadline = time.time() + 300
    while not after_first_validation():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "r" / "seg" / "model.safetensors").exists(), "finished before the kill"
    metrics = _train_seg(tmp_path)
    assert metrics["resumed_from_step"] >= 3
    assert (metrics["holdout_best_epoch"], metrics["holdout_best_step"], metrics["stopped_at_epoch"]) == (1, 2, 3)
    assert metrics["stopped_early"] and metrics["steps"] == 6


@pytest.mark.slow
def test_two_processes_stop_together_and_select_as_one_does(flat_run, tmp_path):
    """torchrun, 2 processes x batch 4 = the single process's batch 8: both validate every held-out image,
    vote to stop at the same epoch (no process left waiting in a collective) and select the same epoch."""
    _, single, _, _ = flat_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "wsss", "train-seg", *_recipe(tmp_path), "seg.batch_size=4"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    both = json.loads((tmp_path / "runs" / "r" / "manifest.json").read_text())["stages"]["train_seg"]["metrics"]
    keys = ("images", "holdout_images", "holdout_best_miou", "holdout_best_epoch", "holdout_best_step",
            "stopped_at_epoch", "stopped_early", "steps")
    assert {k: both[k] for k in keys} == {k: single[k] for k in keys}
