"""Two CPU processes (torchrun, gloo) give what one process gives.

Inference (cam, pseudo, evaluate, predict, crf): the merged outputs are bit-identical to a
single-process run on the same weights, with no file missing or extra. Both runs use 1 intra-op
thread per process: CPU kernels round differently at another thread count (docs/scaling.md).

Training: 2 processes x batch 4 against 1 process x batch 8, which DDP makes the same computation
up to floating-point summation order, provided that
  - data order: `train_loader` gives every process the same seeded permutation and each takes
    every 2nd sample, so step k covers the same 8 samples in both runs;
  - BatchNorm: statistics over 4 images per process differ from 8; the test freezes BN
    (backbone.freeze_bn) and uses smp FPN (GroupNorm decoder, dropout off);
  - augmentation: per-process random streams differ; the test makes it deterministic (crop = image,
    no rescale, no flip);
  - loss: a mean over samples, and DDP averages gradients over processes (equal batches per process).
What remains is float32 rounding (another reduction order in the convolutions and in the gradient
all-reduce), amplified a little by 4 SGD steps: TOLERANCE below (measured here: 1.5e-8 for the CAM
network, 1.4e-5 for the segmenter, whose FPN decoder sums over many more pixels). One process with
batch 4, i.e. other batches, lands 1.3e-3 away: over 1000 times the CAM tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from wsss.cli import main
from wsss.io.images import read_index_png

pytestmark = pytest.mark.slow  # end to end (CPU-small)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"cam": 1e-6, "seg": 1e-4}  # largest |weight difference| after 4 steps (see the docstring)
TINY = ["data.shapes.num_train=24", "data.shapes.num_val=8", "data.shapes.image_size=64",
        "cam.backbone.name=test_resnet", "seg.encoder.name=test_resnet", "cam.max_steps=4", "seg.max_steps=4",
        "cam.crop_size=64", "seg.crop_size=64", "cam_infer.scales=[1.0, 0.5]", "cam_infer.batch_size=5",
        "trainer.num_workers=0", "trainer.threads=1", "trainer.checkpoint_every_steps=100",
        # what makes 2 x batch 4 the same computation as 1 x batch 8 (see the docstring)
        "cam.backbone.freeze_bn=true", "seg.encoder.freeze_bn=true", "cam.scale_range=[1.0, 1.0]",
        "seg.scale_range=[1.0, 1.0]", "cam.hflip=false", "seg.hflip=false", "seg.labels=gt",
        "run.stages=[train_cam, cam, pseudo, train_seg, evaluate]"]


def torchrun(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m wsss ARGS` (free port: parallel tests do not clash)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "wsss", *args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process: the whole pipeline (batch 8), a predict folder and a crf folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = yaml.safe_load((REPO / "configs" / "shapes_cam.yaml").read_text())
    recipe["seg"].update(arch="fpn", arch_kwargs={"decoder_dropout": 0.0})  # GroupNorm decoder, no dropout
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    base = [str(tmp / "recipe.yaml"), f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY]
    main(["run", *base, "run.name=one", "cam.batch_size=8", "seg.batch_size=8"])
    data = next((tmp / "data").glob("shapes-*"))
    (tmp / "in").mkdir()
    for p in sorted((data / "images").glob("val_*.png"))[:6]:
        shutil.copy(p, tmp / "in" / p.name)
    main(["predict", *base, "run.name=one", "cam.batch_size=8", "seg.batch_size=8", "--input", str(tmp / "in"),
          "--output", str(tmp / "pred_one")])
    (tmp / "cams6").mkdir()
    for p in sorted((tmp / "runs" / "one" / "cams").glob("*.npz"))[:6]:
        shutil.copy(p, tmp / "cams6" / p.name)
    main(["crf", "--cams", str(tmp / "cams6"), "--images", str(data / "images"), "--output", str(tmp / "crf_one"),
          "--iterations", "3"])
    return {"tmp": tmp, "base": base, "run": tmp / "runs" / "one", "images": data / "images"}


def _weights(run: Path, part: str) -> dict[str, np.ndarray]:
    return load_file(str(run / part / "model.safetensors"))


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max(initial=0)) for k in a if a[k].dtype.kind == "f")


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_training_two_processes_matches_one_within_tolerance(single):
    tmp, base = single["tmp"], single["base"]
    torchrun("run", *base, "run.name=two", "cam.batch_size=4", "seg.batch_size=4", "--stages", "train_cam,train_seg")
    two = tmp / "runs" / "two"
    stages = _manifest(two)["stages"]
    for stage in ("train_cam", "train_seg"):
        assert stages[stage]["status"] == "done" and stages[stage]["metrics"]["steps"] == 4, stages[stage]
    for part in ("cam", "seg"):
        diff = _max_diff(_weights(single["run"], part), _weights(two, part))
        assert diff < TOLERANCE[part], f"{part}: 2 x batch 4 differs from 1 x batch 8 by {diff:.2e}"
    # the tolerance discriminates: one process with batch 4 takes other steps and lands far away
    main(["run", *base, "run.name=one_b4", "cam.batch_size=4", "--stages", "train_cam"])
    assert _max_diff(_weights(single["run"], "cam"), _weights(tmp / "runs" / "one_b4", "cam")) > 100 * TOLERANCE["cam"]


def test_inference_two_processes_is_bit_identical(single):
    tmp, base, one = single["tmp"], single["base"], single["run"]
    # the same trained run, with its per-image outputs removed, finished by two processes
    two = tmp / "runs" / "infer2"
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("cams", "pseudo", "pred", "metrics"))
    manifest = _manifest(two)
    for stage in ("cam", "pseudo", "evaluate"):
        del manifest["stages"][stage]
    (two / "manifest.json").write_text(json.dumps(manifest))
    res = torchrun("run", *base, "run.name=infer2", "cam.batch_size=8", "seg.batch_size=8")
    assert "train_cam: done for this config, skipping" in res.stdout  # training was not redone
    stages = _manifest(two)["stages"]
    assert stages["cam"]["metrics"]["processes"] == 2 and stages["cam"]["metrics"]["computed"] == 24
    for sub, ext in (("cams", "npz"), ("pseudo", "png"), ("pred", "png")):
        names = sorted(p.name for p in (one / sub).iterdir())
        assert sorted(p.name for p in (two / sub).iterdir()) == names, sub  # no gap, no duplicate, no temporary
        assert len(names) == (8 if sub == "pred" else 24)
        for name in names:
            if ext == "npz":
                with np.load(one / sub / name) as a, np.load(two / sub / name) as b:
                    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), name
            else:
                assert np.array_equal(read_index_png(one / sub / name, 7), read_index_png(two / sub / name, 7)), name
    assert (one / "metrics" / "evaluate.json").read_text() == (two / "metrics" / "evaluate.json").read_text()
    for key in ("cam_seed_miou", "pseudo_miou"):
        assert stages["pseudo"]["metrics"][key] == _manifest(one)["stages"]["pseudo"]["metrics"][key]


@pytest.mark.parametrize("command", ["predict", "crf"])
def test_predict_and_crf_two_processes_are_bit_identical(single, command):
    tmp = single["tmp"]
    if command == "predict":
        torchrun("predict", *single["base"], "run.name=one", "cam.batch_size=8", "seg.batch_size=8",
                 "--input", str(tmp / "in"), "--output", str(tmp / "pred_two"))
        pairs = [(tmp / "pred_one", tmp / "pred_two"), (tmp / "pred_one" / "overlay", tmp / "pred_two" / "overlay")]
    else:
        torchrun("crf", "--cams", str(tmp / "cams6"), "--images", str(single["images"]), "--output", str(tmp / "crf_two"),
                 "--iterations", "3")
        pairs = [(tmp / "crf_one", tmp / "crf_two")]
    for a, b in pairs:
        names = sorted(p.name for p in a.glob("*.png"))
        assert len(names) == 6 and sorted(p.name for p in b.glob("*.png")) == names
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
