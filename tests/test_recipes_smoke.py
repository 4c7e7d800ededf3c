"""The full-scale GPU recipes run on tiny subsets (structure, data plumbing, every stage)."""

from __future__ import annotations

import pytest

import json
from pathlib import Path


from wsss.cli import main

pytestmark = pytest.mark.slow  # end to end (CPU-small)

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


PMM_SMALL = [s for s in SMALL if s != "pseudo.crf=false"] + [
    "cam_infer.multicrop.scales=[0.5]", "cam_infer.multicrop.crop_size=96", "cam_infer.multicrop.stride=64",
    "cyclic.scales=[0.5]", "cyclic.crf=false", "data.max_images=3", "trainer.threads=1"]


def test_voc12mini_pmm_recipe_on_voc12_mini(voc_mini: Path, tmp_path: Path):
    """The CPU PMM recipe on real images: SEAM CAMs, multi-crop, CoV + PPMG (with its CRF), PUF, one cyclic round."""
    main(["run", "configs/voc12mini_pmm.yaml", f"run.root={tmp_path}", f"data.root={voc_mini}", *PMM_SMALL])
    stages = _stages(tmp_path / "voc12mini_pmm")
    assert [s for s, v in stages.items() if v["status"] == "done"] == \
        ["train_cam", "cam", "pseudo", "train_seg", "cyclic", "evaluate", "report"]
    assert len(list((tmp_path / "voc12mini_pmm" / "pseudo_r1").glob("*.png"))) == 3


def test_coco14_pmm_recipe_on_a_tiny_coco(tmp_path: Path):
    from test_data_coco import make_coco

    root = tmp_path / "coco"
    make_coco(root, "train2014")
    make_coco(root, "val2014")
    main(["run", "configs/coco14_pmm.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={root}", *PMM_SMALL])
    stages = _stages(tmp_path / "runs" / "coco14_pmm")
    assert all(v["status"] == "done" for v in stages.values()) and stages["evaluate"]["metrics"]["images"] > 0


def test_voc12mini_scribble_recipe_on_voc12_mini(voc_mini: Path, tmp_path: Path):
    """Simulated scribbles on real images, pCE + DenseCRF loss."""
    main(["run", "configs/voc12mini_scribble_densecrf.yaml", f"run.root={tmp_path}", f"data.root={voc_mini}",
          *SMALL, "data.max_images=3"])
    stages = _stages(tmp_path / "voc12mini_scribble_densecrf")
    assert all(v["status"] == "done" for v in stages.values()) and stages["evaluate"]["metrics"]["images"] == 3
