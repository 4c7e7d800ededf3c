"""CPN and AA&LR ablations on the synthetic set or voc12-mini, next to the multi-stage baseline (and optionally PMM).

Rows (same data, seed, backbone, schedule and pseudo-mask threshold; only the named part changes):
  baseline            configs/shapes_cam.yaml end to end (MLSM CAMs -> threshold masks -> segmenter)
  pmm (--with-pmm)    configs/shapes_pmm.yaml CAM + pseudo stages (SEAM objective, multi-crop, CoV + PPMG)
  cpn_base            configs/shapes_cpn.yaml with cam.cpn.pair=false, prcm=false, raw CAM: the same
                      network and inference as CPN, trained on the crop alone
  cpn_pair            + complementary pair (triplet losses L_tcp, L_cpcr), PCM-refined map (cam_rv)
  cpn_prcm            + PRCM (the full recipe)
  cpn_*_cam           the networks of cpn_pair / cpn_prcm read out as raw CAMs (no retraining)
  aalr_cls            configs/shapes_aalr.yaml with aa_weight=0, lr_weight=0: CE on the classification
                      branch's pseudo masks only
  aalr_aa             + adaptive affinity loss
  aalr_lr             + label reassign loss (the full recipe)
CAM rows report the seed mIoU (best background threshold, picked with GT: the field's convention) and
the pseudo-mask mIoU at the recipe's fixed threshold, both on train; segmenter rows the val mIoU.
Times: the stages' seconds from each run's manifest (one AA&LR training run vs the baseline's
train_cam + cam + pseudo + train_seg). Rerunning resumes and skips finished work.

    python benchmarks/bench_cpn_aalr.py --threads 1                      # every row at the recipes' budget
    python benchmarks/bench_cpn_aalr.py --rows cpn_prcm --set cam.epochs=6 # one row, a smaller budget

The recorded runs (docs/benchmarks.md, "CPN and AA&LR") use a smaller set and budget; rows may run as separate
processes into one --root (different rows never share a run directory).

voc12-mini (`--data voc12mini`): the rows use configs/voc12mini_{cam,pmm,cpn,aalr}.yaml at their own budgets;
the baseline's numbers can come from finished runs instead of a new one (`--upstream`: one run with its
train_cam, cam and pseudo stages, e.g. bench_convergence's image_cam, and optionally the run of its segmenter):

    python benchmarks/bench_cpn_aalr.py --data voc12mini --root runs/bench_cpn_aalr_voc --rows aalr_cls aalr_aa aalr_lr \
        --upstream runs/bench_convergence/image_cam runs/bench_convergence/image_pseudo_s0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOC_DATA = REPO.parent / "shared" / "data" / "voc12-mini"
CAM_STAGES = "[train_cam, cam, pseudo]"
SEG_STAGES = "[train_seg, evaluate]"

# name, label, recipe (configs/<data>_<recipe>.yaml), overrides, run.stages
ROWS: list[tuple[str, str, str, list[str], str]] = [
    ("baseline", "multi-stage baseline (<data>_cam.yaml)", "cam", [], "[train_cam, cam, pseudo, train_seg, evaluate]"),
    ("pmm", "PMM (<data>_pmm.yaml), CAM + pseudo stages", "pmm", [], CAM_STAGES),
    ("cpn_base", "CPN baseline CAM (no pair, no PRCM; raw CAM)", "cpn",
     ["cam.cpn.pair=false", "cam.cpn.prcm=false", "cam_infer.output=cam"], CAM_STAGES),
    ("cpn_pair", "+ complementary pair (PCM map)", "cpn", ["cam.cpn.pair=true", "cam.cpn.prcm=false"], CAM_STAGES),
    ("cpn_prcm", "+ PRCM (full CPN)", "cpn", ["cam.cpn.pair=true", "cam.cpn.prcm=true"], CAM_STAGES),
    # the same trained networks read out as raw CAMs (cam/ linked from the row above; cam + pseudo only)
    ("cpn_pair_cam", "+ complementary pair, raw CAM", "cpn",
     ["cam.cpn.pair=true", "cam.cpn.prcm=false", "cam_infer.output=cam"], "[cam, pseudo]"),
    ("cpn_prcm_cam", "+ PRCM, raw CAM", "cpn", ["cam.cpn.pair=true", "cam.cpn.prcm=true", "cam_infer.output=cam"],
     "[cam, pseudo]"),
    ("aalr_cls", "AA&LR: classification-branch pseudo masks, CE only", "aalr",
     ["seg.aalr.aa_weight=0", "seg.aalr.lr_weight=0"], SEG_STAGES),
    ("aalr_aa", "+ AA loss", "aalr", ["seg.aalr.aa_weight=1", "seg.aalr.lr_weight=0"], SEG_STAGES),
    ("aalr_lr", "+ LR loss (full AA&LR)", "aalr", ["seg.aalr.aa_weight=1", "seg.aalr.lr_weight=1"], SEG_STAGES),
]


LINKS = {"cpn_pair_cam": "cpn_pair", "cpn_prcm_cam": "cpn_prcm"}  # row -> row whose trained cam/ it reads


def run_row(root: Path, name: str, recipe: str, overrides: list[str], stages: str, common: list[str],
            data_root: Path) -> dict:
    """Run one row (resuming) as its own process and return its manifest's stages."""
    if name in LINKS:
        link = root / name / "cam"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(root / LINKS[name] / "cam", target_is_directory=True)
    cmd = [sys.executable, "-m", "wsss", "run", str(REPO / "configs" / f"{recipe}.yaml"), f"run.root={root}",
           f"run.name={name}", f"run.stages={stages}", f"data.root={data_root}", *common, *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((root / name / "manifest.json").read_text())["stages"]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "bench_cpn_aalr")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", nargs="*", default=None, help="row names (default: all but pmm)")
    p.add_argument("--with-pmm", action="store_true", help="add the PMM row")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every row (e.g. a smaller data set)")
    p.add_argument("--data", choices=("shapes", "voc12mini"), default="shapes", help="configs/<data>_*.yaml")
    p.add_argument("--voc-root", type=Path, default=VOC_DATA, help="--data voc12mini: the data set's folder")
    p.add_argument("--upstream", nargs="*", type=Path, default=[], help="finished runs whose stages (merged) are the "
                   "baseline row's numbers instead of running it: a train_cam/cam/pseudo run, then its segmenter's run")
    a = p.parse_args()
    common = [f"trainer.threads={a.threads}", "trainer.seed=0", *a.set]
    wanted = a.rows or [r[0] for r in ROWS if r[0] != "pmm" or a.with_pmm]
    results = {}
    data_root = a.voc_root if a.data == "voc12mini" else a.root / "data"
    for name, label, recipe, overrides, stages in ROWS:
        if name not in wanted and not (name == "baseline" and a.upstream):
            continue
        label = label.replace("<data>", a.data)
        if name == "baseline" and a.upstream:  # read, not run: later manifests add to (or replace) earlier stages
            st = {k: v for run in a.upstream for k, v in json.loads((run / "manifest.json").read_text())["stages"].items()}
        else:
            st = run_row(a.root, name, f"{a.data}_{recipe}", overrides, stages, common, data_root)
        pseudo, ev = st.get("pseudo", {}).get("metrics", {}), st.get("evaluate", {}).get("metrics", {})
        seconds = {s: v.get("seconds") for s, v in st.items() if v.get("status") == "done"}
        results[name] = {"label": label, "seed_miou": pseudo.get("cam_seed_miou"),
                         "seed_threshold": pseudo.get("cam_seed_best_threshold"), "pseudo_miou": pseudo.get("pseudo_miou"),
                         "val_miou": ev.get("miou"), "seconds": seconds,
                         "steps": {s: v.get("metrics", {}).get("steps") for s, v in st.items() if s.startswith("train")}}
        print(json.dumps({name: results[name]}), flush=True)
    print(f"\n{a.data}, overrides: {' '.join(common)}")
    print("| row | CAM seed mIoU (train, best bg thr) | pseudo-mask mIoU (train) | segmenter mIoU (val) | training seconds |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        s = r["seconds"]
        train = sum(s.get(k) or 0 for k in ("train_cam", "cam", "pseudo", "train_seg"))
        thr = f" ({r['seed_threshold']:.2f})" if r["seed_threshold"] is not None else ""
        print(f"| {r['label']} | {pct(r['seed_miou'])}{thr} | {pct(r['pseudo_miou'])} | {pct(r['val_miou'])} | {train:.0f} |")
    out = a.root / "results.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    base = results.get("baseline") or old.get("baseline")  # from this invocation or an earlier one (same root)
    if base and any(n.startswith("aalr") for n in results):
        s = base["seconds"]
        total = sum(s.get(k) or 0 for k in ("train_cam", "cam", "pseudo", "train_seg"))
        print(f"\nmulti-stage baseline: train_cam {s.get('train_cam')} s + cam {s.get('cam')} s + pseudo {s.get('pseudo')} s"
              f" + train_seg {s.get('train_seg')} s = {total:.0f} s (optimiser steps: {base.get('steps')})")
        for n in ("aalr_cls", "aalr_aa", "aalr_lr"):
            if n in results:
                print(f"{n}: one training run {results[n]['seconds'].get('train_seg')} s "
                      f"(+ evaluate {results[n]['seconds'].get('evaluate')} s; steps: {results[n]['steps']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    old.update(results)
    out.write_text(json.dumps(old, indent=1))


if __name__ == "__main__":
    main()
