"""The full-scale GPU recipes run on tiny subsets (structure, data plumbing, every stage)."""

from __future__ import annotations

import json
from pathlib import Path


from wsss.cli import main

SMALL = ["cam.backbone.name=test_resnet", "cam.backbone.weights=none", "seg.encoder.name=test_resnet",
         "seg.encoder.weights=none", "cam.max_steps=2", "seg.max_steps=2", "cam.batch_size=2", "seg.batch_size=2",
         "cam.crop_size=64", "seg.crop_size=64", "cam_infer.scales=[1.0]", "cam_infer.batch_size=2",
         "trainer.num_workers=0", "report.samples=1", "pseudo.crf=false"]


def _stages(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def test_voc12_recipe_on_voc12_mini(voc_mini: Path, tmp_path: Path):
    main(["run", "configs/voc12_cam.yaml", f"run.root={tmp_path}", f"data.root={voc_mini}", "data.train_split=train",
          "data.max_images=4", "pseudo.quality_split=", *SMALL])
    stages = _stages(tmp_path / "voc12_cam")
    assert all(v["status"] == "done" for v in stages.values()) and "evaluate" in stages
    assert len(list((tmp_path / "voc12_cam" / "pseudo").glob("*.png"))) == 4


def test_coco14_recipe_on_a_tiny_coco(tmp_path: Path):
    from test_data_coco import make_coco

    root = tmp_path / "coco"
    make_coco(root, "train2014")
    make_coco(root, "val2014")
    main(["run", "configs/coco14_cam.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={root}", *SMALL])
    stages = _stages(tmp_path / "runs" / "coco14_cam")
    assert all(v["status"] == "done" for v in stages.values())
    assert stages["evaluate"]["metrics"]["images"] > 0
