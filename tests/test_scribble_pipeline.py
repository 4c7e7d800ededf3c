"""`wsss run configs/shapes_scribble_dfr.yaml` end to end on a tiny synthetic set (ViT + DFR loss, CPU)."""

from __future__ import annotations

import pytest

import csv
import json
from pathlib import Path

import torch

from wsss.cli import main

pytestmark = pytest.mark.slow  # end to end (CPU-small)

TINY = ["data.shapes.num_train=16", "data.shapes.num_val=4", "data.shapes.image_size=64", "seg.max_steps=2",
        "seg.batch_size=8", "seg.crop_size=64", "seg.loss.dfr.size=16", "trainer.num_workers=0", "trainer.threads=1",
        "report.samples=2"]


def test_shapes_scribble_dfr_runs_end_to_end(tmp_path: Path) -> None:
    threads = torch.get_num_threads()  # trainer.threads=1 sets it for the process: restore it for other tests
    try:
        main(["run", "configs/shapes_scribble_dfr.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", *TINY])
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "runs" / "shapes_scribble_dfr"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s for s, v in manifest["stages"].items() if v["status"] == "done"] == ["train_seg", "evaluate", "report"]
    train = manifest["stages"]["train_seg"]["metrics"]
    assert train["steps"] == 2 and train["labels"] == "scribble" and train["loss"] == "pce+dfr"
    assert 0.0 <= manifest["stages"]["evaluate"]["metrics"]["miou"] <= 1.0
    assert len(list((run / "pred").glob("*.png"))) == 4
    # every loss term was computed and logged during training
    rows = list(csv.DictReader((run / "seg" / "logs" / "metrics.csv").open()))
    logged = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"train/seg_loss", "train/densecrf_loss", "train/dfr_potts", "train/dfr_consistency"} <= logged
    # the exported network is the ViT segmenter only (the consistency head is a training-time module)
    meta = json.loads((run / "seg" / "model.json").read_text())
    assert meta["config"]["arch"] == "vitseg" and meta["config"]["encoder"]["name"] == "test_vit"
