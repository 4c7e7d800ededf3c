"""PMM ablation: what each component does, measured on the synthetic set and on voc12-mini.

Rows (same CAMs, seeds, segmenter and budget in every row; only the named component changes):
  1. baseline threshold       threshold pseudo masks (pseudo.bg_threshold), segmenter with CE
  2. + CoV smoothing          the same threshold on CoV-smoothed CAMs, CE
  3. + PPMG (segmenter CE)    CoV + PPMG pseudo masks, CE
  -  PPMG without CoV         pseudo masks only (isolates PPMG from the smoothing)
  4. + PUF                    row 3's masks, segmenter with PUF (main and aux heads)
  5. + 1 cyclic round         row 4's segmenter predicts train (MS + flip + CRF), fresh segmenter with CE
  -  fully supervised         the same segmenter on ground-truth masks, CE
  (--nocov-segmenters adds CE and PUF segmenters on the PPMG-without-CoV masks)
For each row: pseudo-mask mIoU on the training split and segmenter mIoU on the validation split
(the recipe's eval protocol). Every row is a run directory under --root; the CAM network and CAMs are
computed once per data set (run `cam/`) and shared through a `cams` symlink, row 4 reads row 3's masks
and row 5 row 4's segmenter the same way, so nothing is computed twice. Rerunning resumes and
skips finished work (the usual stage contract); --fresh starts over.

    python benchmarks/bench_pmm_ablation.py                           # both data sets
    python benchmarks/bench_pmm_ablation.py --data shapes --threads 1
    python benchmarks/bench_pmm_ablation.py --data voc12mini --max-images 100 --set "cam_infer.multicrop.scales=[1.0]"

Recipes: configs/shapes_pmm.yaml, configs/voc12mini_pmm.yaml (--cam baseline swaps in the plain
CAM objective and multi-scale inference of the *_cam.yaml recipes). Prints every number it measures
and adds them to <root>/results.json (one entry per data set and budget).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"shapes": REPO / "configs" / "shapes_pmm.yaml", "voc12mini": REPO / "configs" / "voc12mini_pmm.yaml"}

THRESHOLD = ["pseudo.method=threshold", "pseudo.cov.enabled=false"]
COV = ["pseudo.method=threshold", "pseudo.cov.enabled=true"]
PPMG = ["pseudo.method=ppmg", "pseudo.cov.enabled=true"]
PPMG_NO_COV = ["pseudo.method=ppmg", "pseudo.cov.enabled=false"]
ROW_STAGES = "[pseudo, train_seg, evaluate]"

# name, label, overrides, run.stages, {link name: source run}
ROWS: list[tuple[str, str, list[str], str, dict[str, str]]] = [
    ("threshold", "baseline threshold", THRESHOLD + ["seg.loss.name=ce"], ROW_STAGES, {"cams": "cam"}),
    ("cov", "+ CoV smoothing", COV + ["seg.loss.name=ce"], ROW_STAGES, {"cams": "cam"}),
    ("ppmg_ce", "+ PPMG (segmenter CE)", PPMG + ["seg.loss.name=ce"], ROW_STAGES, {"cams": "cam"}),
    ("ppmg_nocov", "PPMG without CoV (masks only)", PPMG_NO_COV, "[pseudo]", {"cams": "cam"}),
    ("ppmg_puf", "+ PUF", PPMG + ["seg.loss.name=puf"], "[train_seg, evaluate]", {"pseudo": "ppmg_ce"}),
    ("cyclic", "+ 1 cyclic round (CE)", PPMG + ["seg.loss.name=puf", "cyclic.rounds=1", "cyclic.loss=ce"],
     "[cyclic, evaluate]", {"seg": "ppmg_puf"}),
    ("full", "fully supervised (GT masks, CE)", ["seg.labels=gt", "seg.loss.name=ce"], "[train_seg, evaluate]", {}),
]
# --nocov-segmenters: segmenters on the "PPMG without CoV" masks too (the best masks of the baseline CAMs)
NOCOV_ROWS: list[tuple[str, str, list[str], str, dict[str, str]]] = [
    ("ppmg_nocov_ce", "PPMG without CoV, CE", PPMG_NO_COV + ["seg.loss.name=ce"], "[train_seg, evaluate]",
     {"pseudo": "ppmg_nocov"}),
    ("ppmg_nocov_puf", "PPMG without CoV, PUF", PPMG_NO_COV + ["seg.loss.name=puf"], "[train_seg, evaluate]",
     {"pseudo": "ppmg_nocov"}),
]


def run_wsss(recipe: Path, name: str, overrides: list[str], root: Path, log: Path) -> float:
    """`wsss run RECIPE run.name=NAME ...` in this process (imports are paid once), output to `log`; returns seconds."""
    from wsss.cli import main as wsss_main

    argv = ["run", str(recipe), f"run.name={name}", f"run.root={root}", *overrides]
    start = time.time()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print("$ wsss " + " ".join(argv), flush=True)
        try:
            wsss_main(argv)
        except SystemExit as e:  # wsss reports user errors with exit code 2
            if e.code:
                raise RuntimeError(f"{name}: wsss run failed (exit {e.code}); see {log}") from None
    return time.time() - start


def manifest(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / name / "manifest.json").read_text())["stages"]


def link(root: Path, name: str, links: dict[str, str]) -> None:
    """Make `root/name/<dir>` a symlink to `root/<source>/<dir>` (shared upstream outputs)."""
    (root / name).mkdir(parents=True, exist_ok=True)
    for sub, source in links.items():
        target = (root / source / sub).resolve()
        path = root / name / sub
        if not path.is_symlink():
            if path.exists():
                shutil.rmtree(path)
            path.symlink_to(target, target_is_directory=True)


def budget_overrides(args: argparse.Namespace, data: str) -> list[str]:
    """The same seeds and budget for every row of one data set."""
    out = [f"trainer.seed={args.seed}", f"trainer.threads={args.threads}"]
    if args.seg_epochs:
        out += [f"seg.epochs={args.seg_epochs}", "seg.max_steps=0"]
    if args.cam_epochs:
        out += [f"cam.epochs={args.cam_epochs}", "cam.max_steps=0"]
    if args.max_images:
        out.append(f"data.max_images={args.max_images}")
    if args.cam == "baseline":  # the CAM stage of configs/<data>_cam.yaml: MLSM objective, multi-scale + flip
        out += ["cam.method=mlsm", "cam_infer.mode=multiscale", "cam_infer.output=cam"]
    return out + list(args.set)


def data_version(data: str) -> str:
    """What identifies the data beyond the recipe: the synthetic generator's version (stage hashes do not see it)."""
    if data == "shapes":
        from wsss.data.scribble_sim import SIMULATOR_VERSION
        from wsss.data.shapes import GENERATOR_VERSION

        return f"shapes-generator-v{GENERATOR_VERSION}-scribbles-v{SIMULATOR_VERSION}"
    return data


def bench(args: argparse.Namespace, data: str) -> dict[str, Any]:
    recipe = RECIPES[data]
    common = budget_overrides(args, data)
    # One directory per (data set version, budget): rows only hash their own stages, so CAMs made with
    # other settings or data must never sit under the same row directories.
    tag = hashlib.sha256(" ".join(common + [data_version(data)]).encode()).hexdigest()[:8]
    root = args.root / f"{data}-{tag}"
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "bench.log"
    print(f"\n== {data} ({data_version(data)}): {recipe.relative_to(REPO)} (+ {' '.join(common)}); logs in {log}",
          flush=True)
    seconds = {"cam": run_wsss(recipe, "cam", common + ["run.stages=[train_cam, cam]"], root, log)}
    cam_stages = manifest(root, "cam")
    print(f"cam: train_cam {cam_stages['train_cam']['seconds']:.0f} s, cam {cam_stages['cam']['seconds']:.0f} s "
          f"({cam_stages['cam']['metrics'].get('images_per_second')} img/s)", flush=True)
    results: dict[str, Any] = {"recipe": str(recipe.relative_to(REPO)), "overrides": common, "data": data_version(data),
                               "dir": str(root), "rows": {}}
    after = [r[0] for r in ROWS].index("ppmg_nocov") + 1  # the extra rows read that row's masks
    rows = ROWS[:after] + (NOCOV_ROWS if args.nocov_segmenters else []) + ROWS[after:]
    for name, label, overrides, stages, links in rows:
        if args.masks_only:  # CAM / pseudo-mask comparisons without training segmenters
            if "pseudo" not in stages:
                continue
            stages = "[pseudo]"
        link(root, name, links)
        seconds[name] = run_wsss(recipe, name, common + overrides + [f"run.stages={stages}"], root, log)
        row = row_numbers(manifest(root, name), name)
        if args.masks_only:  # a segmenter of an earlier full run may be in the manifest: not part of this run
            for key in ("seg_miou", "eval_protocol", "seg_steps"):
                row.pop(key, None)
        if "pseudo" in links:  # trained on another row's masks: report their quality
            row["pseudo_miou"] = results["rows"][links["pseudo"]].get("pseudo_miou")
        row.update(label=label, seconds=round(seconds[name], 1))
        results["rows"][name] = row
        print(f"{label:34s} pseudo mIoU (train) {_pct(row.get('pseudo_miou'))}   "
              f"segmenter mIoU (val) {_pct(row.get('seg_miou'))}   [{row['seconds']:.0f} s]", flush=True)
    seed = manifest(root, "threshold")["pseudo"]["metrics"]
    results["cam_seed_miou_best_threshold_uses_gt"] = seed.get("cam_seed_miou")
    results["cam_seed_best_threshold"] = seed.get("cam_seed_best_threshold")
    results["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    print(table(data, results), flush=True)
    return results


def row_numbers(stages: dict[str, Any], name: str) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    if "pseudo" in stages:
        out["pseudo_miou"] = stages["pseudo"]["metrics"].get("pseudo_miou")
        out["labelled_fraction"] = stages["pseudo"]["metrics"].get("labelled_fraction")
    if "cyclic" in stages:
        out["pseudo_miou"] = stages["cyclic"]["metrics"].get("r1_pseudo_miou")
    if "evaluate" in stages:
        out["seg_miou"] = stages["evaluate"]["metrics"].get("miou")
        out["eval_protocol"] = stages["evaluate"]["metrics"].get("protocol")
    if "train_seg" in stages:
        out["seg_steps"] = stages["train_seg"]["metrics"].get("steps")
    return out


def _pct(v: Optional[float]) -> str:
    return "  -  " if v is None else f"{100 * v:5.2f}"


def table(data: str, results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = [f"\n### {data}", "", "| row | pseudo-mask mIoU (train) | segmenter mIoU (val) |", "|---|---|---|"]
    for name, r in rows.items():
        pseudo = "GT" if name == "full" else _pct(r.get("pseudo_miou")).strip()
        seg = _pct(r.get("seg_miou")).strip()
        lines.append(f"| {r['label']} | {pseudo} | {seg} |")
    protocol = next((r["eval_protocol"] for r in rows.values() if r.get("eval_protocol")), "")
    lines += ["", f"CAM seed mIoU (train, best background threshold {results['cam_seed_best_threshold']}, "
              f"picked with GT, for reference): {_pct(results['cam_seed_miou_best_threshold_uses_gt']).strip()}",
              f"Segmenter evaluation: {protocol}. Seconds per run: {results['seconds']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=sorted(RECIPES), default=["shapes", "voc12mini"])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "bench_pmm", help="run directories go here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = library default; "
                        "1 is faster on a busy 2-core machine)")
    parser.add_argument("--seg-epochs", type=int, default=0, help="cap every segmenter's epochs (0 = recipe)")
    parser.add_argument("--cam-epochs", type=int, default=0, help="cap the CAM network's epochs (0 = recipe)")
    parser.add_argument("--max-images", type=int, default=0, help="first N ids of each split (0 = all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any further recipe override for every row, e.g. --set cam_infer.multicrop.scales=[1.0]")
    parser.add_argument("--cam", choices=["pmm", "baseline"], default="pmm",
                        help="pmm: the recipe's SEAM objective + multi-crop inference; baseline: MLSM + multi-scale")
    parser.add_argument("--masks-only", action="store_true", help="only the pseudo-mask rows (no segmenters)")
    parser.add_argument("--nocov-segmenters", action="store_true",
                        help="also train segmenters (CE and PUF) on the PPMG-without-CoV masks")
    parser.add_argument("--fresh", action="store_true", help="delete previous run directories of these data sets")
    args = parser.parse_args()
    args.root = args.root.resolve()
    start = time.time()
    out = args.root / "results.json"
    for data in args.data:
        results = bench(args, data)
        all_results = json.loads(out.read_text()) if out.is_file() else {}  # other invocations may have added theirs
        all_results[Path(results["dir"]).name + (" masks-only" if args.masks_only else "")] = results
        out.write_text(json.dumps(all_results, indent=2))
    print(f"\ntotal {time.time() - start:.0f} s; results in {out}")
    print("command: python benchmarks/bench_pmm_ablation.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
