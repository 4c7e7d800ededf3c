"""A tiny PMM run end to end: SEAM CAMs, multi-crop inference, CoV + PPMG, PUF with aux head, one cyclic round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_shapes
from wsss.cam.store import read_cams
from wsss.cli import main
from wsss.io.images import read_index_png

TINY = [*tiny_shapes(num_train=16, num_val=6, size=48, steps=2), "cam_infer.multicrop.scales=[1.0, 1.5]",
        "cam_infer.multicrop.crop_size=40", "cam_infer.multicrop.stride=28", "cyclic.scales=[1.0]"]
pytestmark = pytest.mark.slow  # end to end (CPU-small)


def _run(tmp: Path, *extra: str, command: str = "run") -> dict:
    main([command, "configs/shapes_pmm.yaml", f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY, *extra])
    return json.loads((tmp / "runs" / "shapes_pmm" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pmm_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("pmm")
    return tmp, _run(tmp)


def test_pmm_recipe_runs_end_to_end(pmm_run):
    tmp, manifest = pmm_run
    run = tmp / "runs" / "shapes_pmm"
    stages = manifest["stages"]
    assert [s for s, v in stages.items() if v["status"] == "done"] == \
        ["train_cam", "cam", "pseudo", "train_seg", "cyclic", "evaluate", "report"]
    classes, maps = read_cams(next((run / "cams").glob("*.npz")))
    assert maps.shape[0] == len(classes) and maps.shape[1:] == (48, 48)
    if len(classes):
        assert maps.min() >= 0 and maps.max() <= 1.0 + 1e-3
    assert stages["pseudo"]["metrics"]["method"] == "ppmg"
    masks = [read_index_png(p, 7) for p in sorted((run / "pseudo").glob("*.png"))]
    assert len(masks) == 16 and all(m.shape == (48, 48) and 255 not in m for m in masks)  # PPMG: no ignore
    assert stages["train_seg"]["metrics"]["loss"] == "puf"
    cyc = stages["cyclic"]["metrics"]
    assert cyc["final_model"] == "seg_r1" and cyc["r1_train"]["loss"] == "ce" and "r1_pseudo_miou" in cyc
    assert len(list((run / "pseudo_r1").glob("*.png"))) == 16
    assert (run / "seg_r1" / "model.safetensors").is_file()
    assert 0.0 <= stages["evaluate"]["metrics"]["miou"] <= 1.0


def test_cyclic_best_val_option_selects_on_val(pmm_run):
    tmp, before = pmm_run
    after = _run(tmp, "cyclic.selection=best_val_uses_gt", "seg.max_steps=0", "seg.epochs=2", command="cyclic")
    cyc = after["stages"]["cyclic"]["metrics"]
    assert after["stages"]["cyclic"]["config_hash"] != before["stages"]["cyclic"]["config_hash"]
    assert cyc["selection"] == "best_val_uses_gt"
    assert cyc["r1_train"]["selected_step"] > 0 and 0.0 <= cyc["r1_train"]["selected_val_miou_uses_gt"] <= 1.0
    assert (tmp / "runs" / "shapes_pmm" / "seg_r1" / "best_val" / "model.safetensors").is_file()


def test_more_cyclic_rounds_extend_the_run(pmm_run, tmp_path):
    import shutil

    shutil.copytree(pmm_run[0], tmp_path, dirs_exist_ok=True, symlinks=True)  # the other test changes the shared run
    _run(tmp_path, command="cyclic")  # the recipe's one round, whatever state the copy was in
    run = tmp_path / "runs" / "shapes_pmm"
    r1 = (run / "seg_r1" / "model.safetensors").stat().st_mtime_ns
    before = json.loads((run / "manifest.json").read_text())["stages"]["cyclic"]["metrics"]
    cyc = _run(tmp_path, "cyclic.rounds=2", command="cyclic")["stages"]["cyclic"]["metrics"]
    assert (run / "seg_r1" / "model.safetensors").stat().st_mtime_ns == r1  # round 1 kept
    assert cyc["final_model"] == "seg_r2" and cyc["r1_train"] == before["r1_train"] and "r2_train" in cyc
    assert len(list((run / "pseudo_r2").glob("*.png"))) == 16
