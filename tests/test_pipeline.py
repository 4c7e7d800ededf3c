"""The image-level pipeline end to end on a tiny synthetic set, plus run-directory behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_shapes
from wsss.cam.store import read_cams
from wsss.cli import main
from wsss.io.images import read_index_png

TINY = tiny_shapes()
pytestmark = pytest.mark.slow  # end to end (CPU-small)


def _run(tmp_path: Path, *extra: str, recipe: str = "configs/shapes_cam.yaml", command: str = "run") -> dict:
    args = [command, recipe, f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", *TINY, *extra]
    main(args)
    name = next(a.split("=", 1)[1] for a in [*extra, f"run.name={Path(recipe).stem}"] if a.startswith("run.name="))
    return json.loads((tmp_path / "runs" / name / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("pipeline")
    return tmp, _run(tmp)


def test_all_stages_write_their_outputs(tiny_run):
    tmp, manifest = tiny_run
    run = tmp / "runs" / "shapes_cam"
    assert [s for s, v in manifest["stages"].items() if v["status"] == "done"] == \
        ["train_cam", "cam", "pseudo", "train_seg", "evaluate", "report"]
    assert (run / "config.yaml").is_file() and (run / "cam" / "model.safetensors").is_file()
    cams = sorted((run / "cams").glob("*.npz"))
    assert len(cams) == 24
    classes, maps = read_cams(cams[0])
    assert maps.dtype == np.float32 and maps.shape[0] == len(classes)
    if len(classes):
        assert 0 <= maps.min() and maps.max() <= 1.0 + 1e-3 and maps.shape[1:] == (64, 64)
    mask = read_index_png(run / "pseudo" / cams[0].name.replace(".npz", ".png"), 7)
    assert mask.shape == (64, 64)
    assert len(list((run / "pred").glob("*.png"))) == 8
    metrics = manifest["stages"]["evaluate"]["metrics"]
    assert 0.0 <= metrics["miou"] <= 1.0
    assert "cam_seed_miou" in manifest["stages"]["pseudo"]["metrics"]
    assert "versions" in manifest and "torch" in manifest["versions"]
    html = (run / "report" / "index.html").read_text()
    assert "Per-class IoU" in html and "data:image/jpeg;base64" in html


def test_rerun_skips_done_stages(tiny_run, capsys):
    tmp, before = tiny_run
    after = _run(tmp)
    for stage in ("train_cam", "cam", "pseudo", "train_seg", "evaluate"):
        assert after["stages"][stage]["started"] == before["stages"][stage]["started"], stage
    assert "skipping" in capsys.readouterr().out


def test_changed_config_reruns_downstream_only(tiny_run):
    tmp, before = tiny_run
    after = _run(tmp, "pseudo.bg_threshold=0.3")
    assert after["stages"]["cam"]["started"] == before["stages"]["cam"]["started"]
    assert after["stages"]["pseudo"]["config_hash"] != before["stages"]["pseudo"]["config_hash"]
    assert after["stages"]["train_seg"]["started"] != before["stages"]["train_seg"]["started"]
    assert (tmp / "runs" / "shapes_cam" / "pseudo.old").is_dir()  # previous outputs kept one generation


def test_single_stage_command_and_python_m(tiny_run):
    import subprocess
    import sys

    tmp, _ = tiny_run
    cmd = [sys.executable, "-m", "wsss.stages.evaluate", "configs/shapes_cam.yaml",
           f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY, "pseudo.bg_threshold=0.3"]
    # The first call may evaluate or skip, depending on which tests of this module ran before it on
    # this xdist worker; the second, identical call must find its own outputs and skip.
    for _ in range(2):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping" in res.stdout and "mIoU" not in res.stdout


def test_full_supervision_recipe(tmp_path):
    manifest = _run(tmp_path, recipe="configs/shapes_full.yaml")
    assert manifest["stages"]["train_seg"]["metrics"]["labels"] == "gt"
    assert "cam" not in manifest["stages"]


def test_unwritable_run_root_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as err:
        main(["run", "configs/shapes_cam.yaml", f"run.root={blocker}", *TINY])
    assert err.value.code == 2
    assert "not writable" in capsys.readouterr().err


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    """The report opens in a real browser (Debian chromium) and paints images, tables and text."""
    import shutil
    import subprocess

    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (CI installs it)")
    run_dir, _ = tiny_run
    page = run_dir / "runs" / "shapes_cam" / "report" / "index.html"
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1600, 1200)
    # not a blank page: many distinct colours (heatmaps, overlays) and dark text on white
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    assert (pixels.sum(-1) < 150).mean() > 0.001


def test_seg_seed_reseeds_the_segmenter_alone(tmp_path):
    """seg.seed retrains the segmenter on the same CAMs and pseudo masks; -1 means trainer.seed."""
    from safetensors.numpy import load_file

    stages = "run.stages=[train_cam, cam, pseudo, train_seg]"

    def weights() -> dict:
        return load_file(tmp_path / "runs" / "shapes_cam" / "seg" / "model.safetensors")

    first = _run(tmp_path, stages)["stages"]
    default_weights = weights()
    same = _run(tmp_path, stages, "seg.seed=0")["stages"]  # seg.seed 0 = trainer.seed 0: same segmenter
    assert all(np.array_equal(v, weights()[k]) for k, v in default_weights.items())
    other = _run(tmp_path, stages, "seg.seed=5")["stages"]
    for stage in ("train_cam", "cam", "pseudo"):
        assert first[stage]["started"] == same[stage]["started"] == other[stage]["started"], stage
    assert other["train_seg"]["started"] != same["train_seg"]["started"]
    assert any(not np.array_equal(v, weights()[k]) for k, v in default_weights.items())


def test_seg_init_starts_the_segmenter_from_a_trained_one(tmp_path):
    """seg.init loads another run's segmenter before training (rloss's fine-tuning phase); a bad folder is a ConfigError."""
    from safetensors.numpy import load_file

    from wsss.config import load_recipe, validate
    from wsss.errors import ConfigError

    gt = ("run.stages=[train_seg]", "seg.labels=gt")
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # BN statistics move even at lr 0

    def params(name: str) -> dict:
        state = load_file(tmp_path / "runs" / name / "seg" / "model.safetensors")
        return {k: v for k, v in state.items() if not k.endswith(buffers)}

    _run(tmp_path, *gt, "run.name=first")
    first = params("first")
    _run(tmp_path, *gt, "seg.lr=0", "run.name=fresh")  # lr 0: the weights stay where they started
    _run(tmp_path, *gt, "seg.lr=0", f"seg.init={tmp_path / 'runs' / 'first' / 'seg'}", "run.name=from_first")
    assert any(not np.array_equal(v, params("fresh")[k]) for k, v in first.items())
    assert all(np.array_equal(v, params("from_first")[k]) for k, v in first.items())
    with pytest.raises(ConfigError, match=r"seg\.init: .*missing: no model\.safetensors"):
        validate(load_recipe("configs/shapes_cam.yaml", [f"seg.init={tmp_path / 'missing'}"]))
