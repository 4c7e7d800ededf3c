"""The README's main job: the whole image-level pipeline on the synthetic set, next to full supervision.

Runs configs/shapes_full.yaml (segmenter on ground-truth masks) and configs/shapes_cam.yaml
(train_cam -> cam -> pseudo -> train_seg -> evaluate -> report), then prints the numbers side by side.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from wsss.cli import STAGE_COMMANDS, print_summary
from wsss.config import CONFIG_DIR
from wsss.stages.common import open_run

log = logging.getLogger("wsss")


def _run_recipe(recipe: Path, overrides: list[str], force: bool):
    import importlib

    rd = open_run(str(recipe), overrides, force)
    for stage in rd.cfg.run.stages:
        importlib.import_module(STAGE_COMMANDS[stage][0]).run(rd)
    return rd


def run_demo(overrides: list[str], force: bool = False) -> None:
    start = time.time()
    full = _run_recipe(CONFIG_DIR / "shapes_full.yaml", list(overrides), force)
    weak = _run_recipe(CONFIG_DIR / "shapes_cam.yaml", [*overrides, f"report.compare_run={full.path}"], force)
    f = full.metrics("evaluate").get("miou")
    p = weak.metrics("pseudo")
    w = weak.metrics("evaluate").get("miou")
    print()
    print_summary(full)
    print_summary(weak)
    print(f"\nshapes demo ({time.time() - start:.0f} s):")
    print(f"  CAM seed mIoU (train):            {100 * p.get('cam_seed_miou', float('nan')):.2f}")
    print(f"  pseudo-mask mIoU (train):         {100 * p.get('pseudo_miou', float('nan')):.2f}")
    print(f"  segmenter val mIoU, image labels: {100 * w:.2f}")
    print(f"  segmenter val mIoU, full masks:   {100 * f:.2f}")
    print(f"  weak / full:                      {w / f:.2f}")
    print(f"  report: {weak.sub('report', 'index.html')}")
