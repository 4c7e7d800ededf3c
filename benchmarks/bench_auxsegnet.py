"""AuxSegNet on the synthetic set: what the auxiliary saliency task, the cross-task affinity and the
label-update rounds do, next to the baseline pipeline at the same budget.

Rows (the same CAM network and CAMs everywhere, computed once by the baseline run and linked):
  baseline            configs/shapes_cam.yaml: threshold pseudo masks, DeepLabV3+ (from scratch), seg.epochs
  segmentation only   AuxSegNet without the saliency branch and without refining predictions by an affinity
  + saliency task     the saliency branch and its loss, predictions not refined
  + cross-task aff.   the full network; seg.auxsegnet.rounds rounds (train -> update labels and saliency)
  full_fixed_labels   (only with --only) the full network's rounds without label updates: a control that
                      separates what the updates do from what the warm-started rounds' extra training does
Every AuxSegNet row trains seg.epochs per round on the initial labels (pseudo.method=auxsegnet: CAM +
saliency fusion) starting from the CAM network, so round 1 of each row has the baseline segmenter's
budget. With --upstream (a run that stopped at pseudo), the baseline's segmenter is trained on its masks
for one round's seg.epochs (run baseline_seg, no held-out part). Printed: pseudo-label mIoU on train (round 0 = initial labels; round k = after round k's
update), val mIoU of each round's network (single scale, no CRF), seconds.

    python benchmarks/bench_auxsegnet.py --threads 1                 # the documented budget
    python benchmarks/bench_auxsegnet.py --set data.shapes.num_train=40 --rounds 1   # quick look
    python benchmarks/bench_auxsegnet.py --memory    # peak memory of the affinity part at the recipes' crops
    # voc12-mini at configs/voc12mini_auxsegnet.yaml's budget, on a finished voc12mini_cam.yaml run's CAM
    # network and CAMs (bench_convergence.py's image_cam) and saliency maps made once (its group_saliency):
    python benchmarks/bench_auxsegnet.py --data voc12mini --root runs/bench_auxsegnet_voc --rounds 2 \
        --upstream runs/bench_convergence/image_cam --saliency runs/bench_convergence/group_saliency/saliency

Rerunning resumes and skips finished work (the stage contract). Results: <root>/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_RECIPE = REPO / "configs" / "shapes_cam.yaml"
AUX_RECIPE = REPO / "configs" / "shapes_auxsegnet.yaml"
VOC_BASE_RECIPE = REPO / "configs" / "voc12mini_cam.yaml"
VOC_AUX_RECIPE = REPO / "configs" / "voc12mini_auxsegnet.yaml"
VOC_DATA = REPO.parent / "shared" / "data" / "voc12-mini"

# the budget: small enough for a shared 2-core CPU under load (48 px images: 6 x 6 features, 36 x 36 affinities)
BUDGET = ["data.shapes.num_train=96", "data.shapes.num_val=32", "data.shapes.image_size=48",
          "cam.epochs=8", "cam.crop_size=48", "seg.epochs=8", "seg.crop_size=48",
          "seg.auxsegnet.channels=64", "seg.auxsegnet.rates=[1,2,3]", "trainer.num_workers=0"]

ROWS = [  # name, label, overrides, stages, links {entry: source row}
    ("seg_only", "segmentation only", ["seg.auxsegnet.saliency_task=false", "seg.auxsegnet.cross_affinity=false",
                                        "seg.auxsegnet.rounds=1"], "[pseudo, auxseg_rounds, evaluate]",
     {"cam": "baseline", "cams": "baseline"}),
    ("plus_sal", "+ saliency task", ["seg.auxsegnet.cross_affinity=false", "seg.auxsegnet.rounds=1"],
     "[auxseg_rounds, evaluate]", {"cam": "baseline", "cams": "baseline", "pseudo": "seg_only"}),
    ("full", "+ cross-task affinity", [], "[auxseg_rounds, evaluate]",
     {"cam": "baseline", "cams": "baseline", "pseudo": "seg_only"}),
    # control for the rounds: the same training, labels never updated (not in the default rows)
    ("full_fixed_labels", "+ cross-task affinity, labels not updated", ["seg.auxsegnet.update_labels=false"],
     "[auxseg_rounds, evaluate]", {"cam": "baseline", "cams": "baseline", "pseudo": "seg_only"}),
]
ROUNDS_ROWS = ("full", "full_fixed_labels")  # rows that run --rounds rounds
DEFAULT_ROWS = ("baseline", "seg_only", "plus_sal", "full")


def run_wsss(recipe: Path, name: str, overrides: list[str], root: Path, log: Path) -> float:
    """`wsss run RECIPE run.name=NAME ...` in this process, output to `log`; returns seconds."""
    from wsss.cli import main as wsss_main

    argv = ["run", str(recipe), f"run.name={name}", f"run.root={root}", *overrides]
    start = time.time()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print("$ wsss " + " ".join(argv), flush=True)
        try:
            wsss_main(argv)
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"{name}: wsss exited with {e.code}; see {log}") from None
    return time.time() - start


def val_miou(recipe: Path, overrides: list[str], model_dir: Path) -> float:
    """Single-scale val mIoU of one trained model (each round's network)."""
    import torch

    from wsss.config import load_recipe
    from wsss.metrics import ConfusionMatrix
    from wsss.stages.common import load_predictor, split_dataset

    cfg = load_recipe(str(recipe), overrides)
    ds = split_dataset(cfg, cfg.data.val_split)
    predictor = load_predictor(cfg, model_dir, ds.class_names, torch.device("cpu"))
    cm = ConfusionMatrix(ds.num_classes)
    for sid in ds.ids:
        cm.update(predictor.labels(ds.load_image(sid)), ds.load_mask(sid))
    return cm.compute(ds.class_names).miou


# recipe, feature size (crop / output stride), batch
MEMORY_CASES = [("shapes_auxsegnet (crop 96, OS 8)", 12, 12, 16), ("voc12mini_auxsegnet (crop 320, OS 16)", 20, 20, 8),
                ("voc12_auxsegnet / coco14 (crop 321, OS 8)", 41, 41, 4)]


def affinity_memory(h: int, w: int, batch: int, channels: int = 128) -> tuple[float, float]:
    """(peak MB, MB of one affinity map) of one training step of the affinity part alone (two task
    affinities, feature refinement, cross-task fusion, refined predictions, backward), in a fresh process."""
    import subprocess

    code = f"""
import resource, torch
torch.set_num_threads(1)
from wsss.models.auxsegnet import CrossTaskFusion, TaskAffinity, propagate
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
seg, sal, fusion = TaskAffinity({channels}), TaskAffinity({channels}), CrossTaskFusion()
fs = torch.randn({batch}, {channels}, {h}, {w}, requires_grad=True)
fa = torch.randn({batch}, {channels}, {h}, {w}, requires_grad=True)
init = torch.randn({batch}, 21, {h}, {w}, requires_grad=True)
before = rss()
a_seg, a_sal = seg(fs), sal(fa)
refined_feats = propagate(a_seg, fs) + propagate(a_sal, fa)
out = propagate(fusion(a_seg, a_sal), init)
(out.square().mean() + refined_feats.mean()).backward()
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
print(peak - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return float(out.stdout.strip().splitlines()[-1]), batch * (h * w) ** 2 * 4 / 2**20


def manifest(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / name / "manifest.json").read_text())["stages"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / "runs" / "bench_auxsegnet"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the full row")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every row")
    parser.add_argument("--only", nargs="*", default=[], help="run only these rows (baseline seg_only plus_sal full; full_fixed_labels), "
                        "e.g. in parallel processes once the baseline's CAMs and seg_only's labels exist")
    parser.add_argument("--memory", action="store_true", help="only measure the affinity part's peak memory")
    parser.add_argument("--data", choices=("shapes", "voc12mini"), default="shapes",
                        help="shapes: the reduced budget above; voc12mini: the voc12mini recipes' own budget")
    parser.add_argument("--voc-root", default=str(VOC_DATA), help="--data voc12mini: the data set's folder")
    parser.add_argument("--upstream", default="", help="a finished run of the baseline recipe (train_cam, cam, "
                        "pseudo) whose CAM network and CAMs every row links, instead of running the baseline")
    parser.add_argument("--saliency", default="", help="a folder of saliency maps (data.saliency_dir) for every row")
    args = parser.parse_args()
    if args.memory:
        print("| recipe | features | batch | one hw x hw map (MB) | peak of a training step, affinity part (MB) |")
        print("|---|---|---|---|---|")
        for label, h, w, batch in MEMORY_CASES:
            peak, one = affinity_memory(h, w, batch)
            print(f"| {label} | {h} x {w} | {batch} | {one:.1f} | {peak:.0f} |", flush=True)
        return
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.data == "voc12mini":
        base_recipe, aux_recipe, budget, data_root = VOC_BASE_RECIPE, VOC_AUX_RECIPE, [], Path(args.voc_root)
    else:
        base_recipe, aux_recipe, budget, data_root = BASE_RECIPE, AUX_RECIPE, BUDGET, root / "data"
    saliency = [f"data.saliency_dir={Path(args.saliency).resolve()}"] if args.saliency else []
    common = [*budget, f"data.root={data_root}", f"trainer.threads={args.threads}", *saliency, *args.set]
    log = root / "bench.log"
    results: dict[str, Any] = {"budget": common, "rounds": args.rounds, "rows": {}}

    want = lambda row: row in (args.only or DEFAULT_ROWS)  # noqa: E731
    base_dir = Path(args.upstream).resolve() if args.upstream else root / "baseline"
    secs = 0.0
    if want("baseline") and not args.upstream:
        secs = run_wsss(base_recipe, "baseline", [*common, "run.stages=[train_cam, cam, pseudo, train_seg, evaluate]"], root, log)
    st = json.loads((base_dir / "manifest.json").read_text())["stages"]
    base_val = st.get("evaluate", {}).get("metrics", {}).get("miou")
    if base_val is None and want("baseline"):  # an upstream run stopped at pseudo: its segmenter at one round's budget
        from wsss.config import load_recipe

        epochs = load_recipe(aux_recipe, common).seg.epochs
        (root / "baseline_seg").mkdir(exist_ok=True)
        if not (root / "baseline_seg" / "pseudo").exists():
            (root / "baseline_seg" / "pseudo").symlink_to(base_dir / "pseudo", target_is_directory=True)
        secs = run_wsss(base_recipe, "baseline_seg", [*common, f"seg.epochs={epochs}", "seg.convergence.holdout=0",
                                                      "seg.val_every=0", "run.stages=[train_seg, evaluate]"], root, log)
        base_val = manifest(root, "baseline_seg")["evaluate"]["metrics"]["miou"]
    base = {"label": "baseline (threshold + DeepLabV3+)", "seconds": round(secs), "pseudo_miou": {0: st["pseudo"]["metrics"]["pseudo_miou"]},
            "val_miou": {1: base_val} if base_val is not None else {}, "cam_seed_miou": st["pseudo"]["metrics"]["cam_seed_miou"]}
    results["rows"]["baseline"] = base
    print(f"baseline ({base_dir}): CAM seed {100 * base['cam_seed_miou']:.2f}, pseudo {100 * base['pseudo_miou'][0]:.2f}, "
          f"val {'-' if base_val is None else f'{100 * base_val:.2f}'} ({secs:.0f} s)", flush=True)

    for name, label, overrides, stages, links in ROWS:
        if not want(name):
            continue
        run_dir = root / name
        run_dir.mkdir(exist_ok=True)
        for entry, source in links.items():
            link = run_dir / entry
            if not link.exists():
                link.symlink_to((base_dir if source == "baseline" else root / source) / entry, target_is_directory=True)
        rows = [*overrides, f"seg.auxsegnet.rounds={args.rounds}"] if name in ROUNDS_ROWS else overrides
        ov = [*common, *rows, f"run.stages={stages}"]
        secs = run_wsss(aux_recipe, name, ov, root, log)
        rounds = manifest(root, name)["auxseg_rounds"]["metrics"]
        n = rounds["rounds"]
        initial = manifest(root, "seg_only")["pseudo"]["metrics"]["pseudo_miou"]
        row = {"label": label, "seconds": round(secs), "pseudo_miou": {0: initial},
               "val_miou": {}}
        for k in range(1, n + 1):
            row["pseudo_miou"][k] = rounds.get(f"r{k}_pseudo_miou")
            row["val_miou"][k] = round(val_miou(aux_recipe, [*ov, f"run.root={root}", f"run.name={name}"],
                                                run_dir / f"seg_r{k}"), 4)
        row["evaluate_stage_miou"] = manifest(root, name)["evaluate"]["metrics"]["miou"]
        # per-round training seconds (recorded since rounds could be added to a finished run; None before)
        row["train_seconds"] = {k: (rounds.get(f"r{k}_train") or {}).get("seconds") for k in range(1, n + 1)}
        results["rows"][name] = row
        print(f"{label}: pseudo mIoU by round {[None if v is None else round(100 * v, 2) for v in row['pseudo_miou'].values()]}, "
              f"val mIoU by round {[round(100 * v, 2) for v in row['val_miou'].values()]}, "
              f"training s by round {list(row['train_seconds'].values())} ({secs:.0f} s in this invocation)", flush=True)

    print("\n| row | pseudo mIoU r0 (train) | round | val mIoU | pseudo mIoU after the round's update |")
    print("|---|---|---|---|---|")
    for name, row in results["rows"].items():
        if not row["val_miou"]:  # an upstream baseline without a segmenter
            print(f"| {row['label']} | {100 * row['pseudo_miou'][0]:.2f} | - | - | - |")
        for k, v in row["val_miou"].items():
            after = row["pseudo_miou"].get(k) if name != "baseline" else None
            print(f"| {row['label']} | {100 * row['pseudo_miou'][0]:.2f} | {k} | {100 * v:.2f} | "
                  f"{'-' if after is None else f'{100 * after:.2f}'} |")
    out = root / ("results.json" if not args.only else f"results_{'_'.join(args.only)}.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
