"""Comparisons at convergence on voc12-mini (issue 16, parts 2 and 3): rows x seeds under the convergence protocol.

Each row is a recipe plus overrides, run as `wsss run RECIPE run.stages=[train_seg,evaluate]` with the
recipe's convergence protocol (a fixed held-out part of train, early stopping on its mIoU, the best
held-out weights exported; docs/protocol.md); val is evaluated once, at the end, and only reported.
Runs already done are read back (rerun the command to extend a table), so a long table can be filled
over several sessions.

    nice -n 10 python benchmarks/bench_convergence.py --table scribbles --seeds 0 1 2
    nice -n 10 python benchmarks/bench_convergence.py --table scribbles --rows pce densecrf --seeds 0

Prints one line per run as it finishes, then the table: val mIoU mean +- sample std over seeds, the best
held-out mIoU, the epoch it came from, and where training stopped. `--progress` runs nothing and prints
the held-out mIoU per epoch of the runs so far (finished or not) from their logs.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "voc12-mini"

# name -> (recipe, overrides). "full" trains on ground-truth masks with the same network and protocol.
TABLES: dict[str, dict[str, tuple[str, list[str]]]] = {
    "scribbles": {
        "full": ("voc12mini_scribble_pce.yaml", ["seg.labels=gt", "seg.loss.name=ce"]),
        "pce": ("voc12mini_scribble_pce.yaml", []),
        "densecrf": ("voc12mini_scribble_densecrf.yaml", []),
        "dfr": ("voc12mini_scribble_dfr.yaml", []),
        "ncut": ("voc12mini_scribble_ncut.yaml", []),
        "potts": ("voc12mini_scribble_potts.yaml", []),
        "kernelcut": ("voc12mini_scribble_kernelcut.yaml", []),
    },
}


def run_row(name: str, recipe: str, overrides: list[str], seed: int, args: argparse.Namespace) -> dict:
    """Train + evaluate one row at one seed (or read the finished run back); its numbers."""
    run_name = f"{args.table}_{name}_s{seed}"
    cmd = [sys.executable, "-m", "wsss", "run", str(REPO / "configs" / recipe), f"data.root={args.data}",
           f"run.root={args.out}", f"run.name={run_name}", "run.stages=[train_seg,evaluate]", f"trainer.seed={seed}",
           f"trainer.threads={args.threads}", *overrides, *args.set]
    manifest = Path(args.out) / run_name / "manifest.json"
    log = Path(args.out) / f"{run_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    stages = json.loads(manifest.read_text())["stages"]
    train = stages["train_seg"]["metrics"]
    return {"val": 100 * stages["evaluate"]["metrics"]["miou"], "seconds": stages["train_seg"]["seconds"],
            "heldout": 100 * train["holdout_best_miou"] if train.get("holdout_best_miou") is not None else float("nan"),
            "best_epoch": train.get("holdout_best_epoch", "-"), "stopped_epoch": train.get("stopped_at_epoch", "-"),
            "steps": train["steps"]}


def progress(args: argparse.Namespace, rows: dict) -> None:
    """Held-out mIoU per epoch of every run of the table so far, read from its metrics.csv."""
    print("| run | epochs | held-out mIoU by epoch (%) | best (epoch) | status |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        for name in rows:
            run = Path(args.out) / f"{args.table}_{name}_s{seed}"
            log = run / "seg" / "logs" / "metrics.csv"
            if not log.is_file():
                continue
            with open(log) as f:
                curve = [float(r["holdout/miou"]) * 100 for r in csv.DictReader(f) if r.get("holdout/miou")]
            if not curve:
                continue
            stages = json.loads((run / "manifest.json").read_text())["stages"]
            status = "evaluated" if stages.get("evaluate", {}).get("status") == "done" else stages["train_seg"]["status"]
            best = max(range(len(curve)), key=curve.__getitem__)
            print(f"| {run.name} | {len(curve)} | {' '.join(f'{v:.1f}' for v in curve)} | {curve[best]:.2f} ({best + 1}) | "
                  f"{status} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES), default="scribbles")
    p.add_argument("--rows", nargs="*", default=None, help="a subset of the table's rows (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "bench_convergence"))
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every row")
    p.add_argument("--progress", action="store_true", help="run nothing; print the held-out curves so far")
    args = p.parse_args()
    rows = {k: v for k, v in TABLES[args.table].items() if args.rows is None or k in args.rows}
    if args.progress:
        return progress(args, rows)
    results: dict[str, list[dict]] = {k: [] for k in rows}
    print("| row | seed | val mIoU | best held-out mIoU | best epoch | stopped at epoch | steps | train_seg s |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:  # seed-major: an interrupted table still has every row at the first seeds
        for name, (recipe, overrides) in rows.items():
            r = run_row(name, recipe, overrides, seed, args)
            results[name].append(r)
            print(f"| {name} | {seed} | {r['val']:.2f} | {r['heldout']:.2f} | {r['best_epoch']} | {r['stopped_epoch']} | "
                  f"{r['steps']} | {r['seconds']:.0f} |")
            sys.stdout.flush()
    print(f"\n| row | val mIoU, mean +- std ({len(args.seeds)} seeds) | held-out mIoU, mean | runs |")
    print("|---|---|---|---|")
    for name, rs in results.items():
        vals = [r["val"] for r in rs]
        spread = f" +- {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        print(f"| {name} | {statistics.mean(vals):.2f}{spread} | {statistics.mean(r['heldout'] for r in rs):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in vals)} |")


if __name__ == "__main__":
    main()
