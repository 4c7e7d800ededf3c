"""Group-WSSS vs the single-image CAM baseline on `shapes`, same data, seed, epochs and segmenter.

Rows (each a `wsss run` with the overrides below on a reduced shapes budget, see BUDGET):
  cam_threshold      configs/shapes_cam.yaml: single-image MLSM CAMs, multi-scale inference, threshold masks
  cam_salfusion      the same CAMs, masks by saliency_fusion (the group recipe's generator): isolates the generator
  group_T3           configs/shapes_group.yaml: N=3, T=3, graph dropout, accumulated maps (the code's defaults)
  group_T1           T=1
  group_T3_nodrop    no graph dropout
  group_N4           N=4 (the paper's group size)
  group_T3_msinfer   group_T3's network, ordinary multi-scale CAM inference (stage cam) instead of accumulated maps

Seed mIoU = CAM mIoU at the best background threshold of the pseudo stage's sweep (looks at train GT;
reported for both kinds of maps alike); pseudo mIoU = the masks the segmenter trains on (train GT);
segmenter mIoU on val. Seconds per CAM epoch = train_cam seconds / epochs (wall clock on a shared
machine: compare within one invocation only). A group step runs N images per anchor, so at the same
number of epochs group mining costs about N times the forward/backward passes of the baseline.

    python benchmarks/bench_group.py --rows all --out runs/bench_group        # sequential
    python benchmarks/bench_group.py --rows cam_threshold,cam_salfusion --out runs/bench_group &   # lanes
    python benchmarks/bench_group.py --table --out runs/bench_group          # the table from the JSONs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EPOCHS = 4  # CAM epochs of every row (a shared 2-core machine: the budget is tiny on purpose)
BUDGET = ["data.shapes.num_train=48", "data.shapes.num_val=24", "data.shapes.image_size=48", "data.shapes.seed=0",
          f"cam.epochs={EPOCHS}", "cam.crop_size=48", "cam.scale_range=[0.8, 1.2]", "seg.epochs=6", "seg.batch_size=12",
          "seg.crop_size=48", "trainer.seed=0", "trainer.threads=1", "trainer.num_workers=0"]
GROUP = ["cam.batch_size=4", "cam.group.size=48", "run.stages=[train_cam, accumulated_cams, pseudo, train_seg, evaluate]"]
BASE = ["cam.batch_size=12", "run.stages=[train_cam, cam, pseudo, train_seg, evaluate]"]

# name -> (recipe, run name (rows sharing one reuse its finished stages), overrides)
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "cam_threshold": ("configs/shapes_cam.yaml", "cam", BASE),
    "cam_salfusion": ("configs/shapes_cam.yaml", "cam", BASE + ["pseudo.method=saliency_fusion"]),
    "group_T3": ("configs/shapes_group.yaml", "group_T3", GROUP),
    "group_T3_msinfer": ("configs/shapes_group.yaml", "group_T3", GROUP[:2] + [
        "run.stages=[train_cam, cam, pseudo, train_seg, evaluate]"]),
    "group_T1": ("configs/shapes_group.yaml", "group_T1", GROUP + ["cam.group.steps=1"]),
    "group_T3_nodrop": ("configs/shapes_group.yaml", "group_T3_nodrop", GROUP + ["cam.group.graph_dropout=false"]),
    "group_N4": ("configs/shapes_group.yaml", "group_N4", GROUP + ["cam.group.group_size=4"]),
}


# rows that rerun stages with --force first: they share group_T3's run directory (its trained network),
# whose cams/ were written by accumulated_cams; the stage cam would otherwise resume from those files
FORCE_FIRST = {"group_T3_msinfer": ("cam", "pseudo", "train-seg", "evaluate")}


def run_row(name: str, out: Path) -> dict:
    """Run one row's pipeline and return its numbers (also written to <out>/<row>.json)."""
    recipe, run_name, extra = ROWS[name]
    args = [recipe, f"run.root={out / 'runs'}", f"run.name={run_name}", f"data.root={out / 'shapes'}", *BUDGET, *extra]
    start = time.time()
    for command in FORCE_FIRST.get(name, ()):
        subprocess.run([sys.executable, "-m", "wsss", command, *args, "--force"], check=True, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "wsss", "run", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stages = json.loads((out / "runs" / run_name / "manifest.json").read_text())["stages"]
    cam = stages["train_cam"]
    epochs = EPOCHS
    row = {"row": name, "seed_miou": stages["pseudo"]["metrics"].get("cam_seed_miou"),
           "pseudo_miou": stages["pseudo"]["metrics"].get("pseudo_miou"),
           "labelled": stages["pseudo"]["metrics"].get("labelled_fraction"),
           "seg_val_miou": stages["evaluate"]["metrics"].get("miou"),
           "cam_seconds_per_epoch": round(cam["seconds"] / epochs, 1), "cam_steps": cam["metrics"]["steps"],
           "wall_seconds": round(time.time() - start, 1), "command": " ".join(cmd[1:])}
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def table(out: Path) -> str:
    """Markdown table of the rows measured so far."""
    lines = ["| row | seed mIoU | pseudo mIoU (labelled %) | segmenter val mIoU | CAM s/epoch | CAM steps |",
             "|---|---|---|---|---|---|"]
    for name in ROWS:
        p = out / f"{name}.json"
        if p.is_file():
            r = json.loads(p.read_text())
            lines.append(f"| {name} | {_pct(r['seed_miou'])} | {_pct(r['pseudo_miou'])} ({_pct(r['labelled'], 1)}) | "
                         f"{_pct(r['seg_val_miou'])} | {r['cam_seconds_per_epoch']} | {r['cam_steps']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help="comma-separated row names or 'all'")
    p.add_argument("--out", default="runs/bench_group")
    p.add_argument("--table", action="store_true", help="only print the table of finished rows")
    args = p.parse_args()
    out = Path(args.out)
    if not args.table:
        out.mkdir(parents=True, exist_ok=True)
        for name in (list(ROWS) if args.rows == "all" else args.rows.split(",")):
            print(json.dumps(run_row(name, out)), flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
