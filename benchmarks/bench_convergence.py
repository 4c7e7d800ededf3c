"""Comparisons at convergence on voc12-mini (issue 16, parts 2 and 3): rows x seeds under the convergence protocol.

Each row is a recipe plus overrides, run as `wsss run RECIPE run.stages=[train_seg,evaluate]` (or the
row's stages) with the recipe's convergence protocol (a fixed held-out part of train validated every
epoch; the voc12-mini recipes train a 20-epoch poly schedule to 0 and keep the last weights, see
docs/protocol.md); val is evaluated once, at the end, and only reported. Runs already done are read
back (rerun the command to extend a table), so a long table can be filled over several sessions.

Tables:
  scribbles  full supervision, pCE and the regularized losses (no CAMs; seeds vary trainer.seed),
             pce_images: pCE with the feature cache off (the cache's check at convergence), and
             ncut_present / kernelcut_present: the normalized cut over the image's own classes,
             ncut_weak: the normalized cut at a tenth of the recipe's weight (a diagnostic),
             dfr_predwarm: DFR whose head pairs take no prediction labels in the first quarter (a diagnostic),
             <loss>_ft: rloss's second phase, the pce row's segmenter fine-tuned with the regulariser
             (seg.init; run the pce row of the same seed first)
  image      the image-level pipeline of configs/voc12mini_cam.yaml (section 4): one CAM run, its
             PSA + dense-CRF pseudo masks, segmenters at 3 seeds (seg.seed), and the GT row
  group      Group-WSSS (issue 13) on the `image` table's CAM run: saliency maps once, the baseline CAMs
             with the group recipe's saliency_fusion masks, group-mining networks (N=3 T=3 with graph
             dropout = the code's defaults; T=1; no dropout; N=4) whose seed / mask mIoU are in the setup
             lines; segmenters on the threshold, saliency-fusion and group T=3 masks
  pmm        the PMM ablation (section 6) on the same CAMs as `image` (the plain CAM network with
             multi-scale inference, which §6 calls --cam baseline): threshold / CoV / PPMG masks made
             once, CE / PUF segmenters and one cyclic round at 3 seeds (seg.seed), and the GT row
Runs a table needs once (CAMs, pseudo masks) are made first with trainer.seed=0 and shared through
symlinks (`cams`, `pseudo`, `seg`); the seeds change only the segmenters. A row records the stage hashes
of the runs it links (`<run>/links.json`) and is rerun with --force when one of them was remade.

    nice -n 10 python benchmarks/bench_convergence.py --table scribbles --seeds 0 1 2
    nice -n 10 python benchmarks/bench_convergence.py --table scribbles --rows pce densecrf --seeds 0
    nice -n 10 python benchmarks/bench_convergence.py --table pmm --seeds 0 1 2 --threads 1

Prints one line per run as it finishes, then the table: val mIoU mean +- sample std over seeds, the
held-out mIoU of the model kept (seg.convergence.keep: last or best), the best held-out mIoU and its
epoch, and where training stopped (and, for rows trained on pseudo
masks, the masks' mIoU on the train split). `--progress` runs nothing and prints the held-out mIoU per
epoch of the runs so far (finished or not) from their logs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from wsss.io import atomic

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "voc12-mini"


@dataclass(frozen=True)
class Run:
    """One `wsss run`: a recipe, overrides, stages, and the run directories it links in ({seed} is filled)."""

    recipe: str
    overrides: tuple[str, ...] = ()
    stages: str = "[train_seg, evaluate]"
    links: dict[str, str] = field(default_factory=dict)  # sub-directory -> run name whose sub-directory it is
    name: str = ""  # run name template; "" = <table>_<row>_s{seed}
    seed_key: str = "seg.seed"  # what the row's seed sets


@dataclass(frozen=True)
class Table:
    rows: dict[str, Run]
    setup: dict[str, Run] = field(default_factory=dict)  # made once, before the rows, with trainer.seed=0


# The scribble rows have no CAM stage: their seed is trainer.seed (what the first runs used).
FULL_SCRIBBLE = Run("voc12mini_scribble_pce.yaml", ("seg.labels=gt", "seg.loss.name=ce"), seed_key="trainer.seed")
SCRIBBLES = Table({
    "full": FULL_SCRIBBLE,
    **{row: Run(f"voc12mini_scribble_{row}.yaml", seed_key="trainer.seed")
       for row in ("pce", "densecrf", "dfr", "ncut", "potts", "kernelcut")},
    # the feature cache's check at convergence (issue 16 part 1): pCE trained on images instead
    "pce_images": Run("voc12mini_scribble_pce.yaml", ("seg.feature_cache.enabled=false",), seed_key="trainer.seed"),
    # the normalized cut over background and the image's tagged classes only (not the paper's all-class sum)
    "ncut_present": Run("voc12mini_scribble_ncut.yaml", ("seg.loss.ncut.classes=present",), seed_key="trainer.seed"),
    "kernelcut_present": Run("voc12mini_scribble_kernelcut.yaml", ("seg.loss.kernelcut.ncut.classes=present",),
                             seed_key="trainer.seed"),
    # diagnostic: the normalized cut at a tenth of the calibrated weight (is the collapse the weight's?)
    "ncut_weak": Run("voc12mini_scribble_ncut.yaml", ("seg.loss.ncut.weight=0.32",), seed_key="trainer.seed"),
    # diagnostic: the DFR head learns from scribble cells alone for the first quarter of the 20-epoch schedule
    # (5 epochs x 33 steps), before confident predictions join its pairs
    "dfr_predwarm": Run("voc12mini_scribble_dfr.yaml", ("seg.loss.dfr.prediction_labels_from_step=165",),
                        seed_key="trainer.seed"),
    # rloss's two phases: the pce row's segmenter (same seed) fine-tuned with the regulariser, same protocol
    **{f"{row}_ft": Run(f"voc12mini_scribble_{row}.yaml", ("seg.init={out}/scribbles_pce_s{seed}/seg",),
                        seed_key="trainer.seed")
       for row in ("densecrf", "dfr", "ncut", "potts", "kernelcut")},
})

# The image-level pipeline: CAMs and the recipe's pseudo masks once, then the segmenter. Its GT row is
# the scribble table's (the scribble recipes inherit this segmenter and protocol unchanged).
IMAGE = Table(
    setup={"image_cam": Run("voc12mini_cam.yaml", stages="[train_cam, cam, pseudo]")},
    rows={"pseudo": Run("voc12mini_cam.yaml", links={"pseudo": "image_cam"}),
          "full": Run(FULL_SCRIBBLE.recipe, FULL_SCRIBBLE.overrides, name="scribbles_full_s{seed}",
                      seed_key="trainer.seed")},
)

THRESHOLD = ("pseudo.method=threshold", "pseudo.cov.enabled=false")
COV = ("pseudo.method=threshold", "pseudo.cov.enabled=true")
PPMG = ("pseudo.method=ppmg", "pseudo.cov.enabled=true")
PMM_RECIPE = "voc12mini_pmm.yaml"
PMM = Table(
    setup={**IMAGE.setup,  # the plain CAM network + multi-scale inference of voc12mini_cam.yaml
           **{f"pmm_{masks}": Run(PMM_RECIPE, over, stages="[pseudo]", links={"cams": "image_cam"})
              for masks, over in (("threshold", THRESHOLD), ("cov", COV), ("ppmg", PPMG))}},
    rows={
        "threshold": Run(PMM_RECIPE, THRESHOLD + ("seg.loss.name=ce",), links={"pseudo": "pmm_threshold"}),
        "cov": Run(PMM_RECIPE, COV + ("seg.loss.name=ce",), links={"pseudo": "pmm_cov"}),
        "ppmg_ce": Run(PMM_RECIPE, PPMG + ("seg.loss.name=ce",), links={"pseudo": "pmm_ppmg"}),
        "ppmg_puf": Run(PMM_RECIPE, PPMG + ("seg.loss.name=puf",), links={"pseudo": "pmm_ppmg"}),
        # one round on the PUF segmenter of the same seed: its MS + flip + CRF predictions, a fresh CE segmenter
        "cyclic": Run(PMM_RECIPE, PPMG + ("seg.loss.name=puf", "cyclic.rounds=1", "cyclic.loss=ce"),
                      stages="[cyclic, evaluate]", links={"seg": "pmm_ppmg_puf_s{seed}"}),
        "full": Run(PMM_RECIPE, ("seg.labels=gt", "seg.loss.name=ce")),
    },
)

# Group-WSSS (issue 13) on the same CAM run as `image`: saliency maps once (the saliency stage's bundled
# network), the baseline CAMs through the group recipe's generator (saliency_fusion: isolates the
# generator), and group-mining CAM networks (accumulated maps) with the code's defaults and the paper's
# variants. The setup lines carry the seed and pseudo-mask mIoU; the rows train segmenters on the masks.
GROUP_RECIPE = "voc12mini_group.yaml"
SALIENCY = ("data.saliency_dir={out}/group_saliency/saliency",)  # made once by the setup run group_saliency
SALFUSION = ("pseudo.method=saliency_fusion", "pseudo.crf=false")
GROUP_CAM = "[train_cam, accumulated_cams, pseudo]"
GROUP = Table(
    setup={**IMAGE.setup,
           "group_saliency": Run(GROUP_RECIPE, stages="[saliency]"),
           "group_cam_salfusion": Run("voc12mini_cam.yaml", SALIENCY + SALFUSION, stages="[pseudo]",
                                      links={"cams": "image_cam"}),
           "group_T3": Run(GROUP_RECIPE, SALIENCY, stages=GROUP_CAM),
           "group_T1": Run(GROUP_RECIPE, SALIENCY + ("cam.group.steps=1",), stages=GROUP_CAM),
           "group_T3_nodrop": Run(GROUP_RECIPE, SALIENCY + ("cam.group.graph_dropout=false",), stages=GROUP_CAM),
           "group_N4": Run(GROUP_RECIPE, SALIENCY + ("cam.group.group_size=4",), stages=GROUP_CAM)},
    rows={"cam_threshold": Run("voc12mini_cam.yaml", links={"pseudo": "image_cam"}, name="image_pseudo_s{seed}"),
          "cam_salfusion": Run("voc12mini_cam.yaml", links={"pseudo": "group_cam_salfusion"}),
          "group_T3": Run(GROUP_RECIPE, links={"pseudo": "group_T3"})},
)
TABLES: dict[str, Table] = {"scribbles": SCRIBBLES, "image": IMAGE, "pmm": PMM, "group": GROUP}


def run_name(table: str, row: str, run: Run, seed: int) -> str:
    return (run.name or f"{table}_{row}_s{{seed}}").format(seed=seed)


def link_upstream(out: Path, name: str, links: dict[str, str], seed: int) -> None:
    """`bench_pmm_ablation.link` with the seed filled in, after checking that every source exists."""
    from bench_pmm_ablation import link

    sources = {sub: source.format(seed=seed) for sub, source in links.items()}
    for sub, source in sources.items():
        if not (out / source / sub).is_dir():
            raise SystemExit(f"{out / name}: needs {out / source / sub}, which does not exist "
                             f"(make it first: --setup {source} --rows)")
    link(out, name, sources)


def upstream_state(out: Path, links: dict[str, str], seed: int) -> dict:
    """The config hashes of every stage of each linked run: a row's own stage hashes do not see them."""
    state = {}
    for sub, source in sorted(links.items()):
        run = source.format(seed=seed)
        manifest = out / run / "manifest.json"
        stages = json.loads(manifest.read_text())["stages"] if manifest.is_file() else {}
        state[sub] = {"run": run, "hashes": {k: v.get("config_hash") for k, v in sorted(stages.items())}}
    return state


def mirror_run(source: Path, target: Path, copy_below: int = 1 << 20) -> None:
    """`target` becomes a copy of `source` (a finished setup run of another --out) whose files of `copy_below`
    bytes or more are symlinks (weights, checkpoints, large maps: shared, not duplicated). wsss writes those
    by atomic replace, which replaces a link rather than writing through it; the small files (manifest,
    configs, logs, which a rerun stage may rewrite in place) are copies. A run folder that is itself a
    symlink out of its run.root is refused by `wsss run`, hence the per-file mirror."""
    if not (source / "manifest.json").is_file():
        raise SystemExit(f"--setup-from: {source} has no manifest.json (not a wsss run)")
    for folder, _, files in os.walk(source):
        here = target / Path(folder).relative_to(source)
        here.mkdir(parents=True, exist_ok=True)
        for f in files:
            src, dst = Path(folder) / f, here / f
            if dst.exists() or dst.is_symlink():
                continue
            if src.stat().st_size >= copy_below:
                dst.symlink_to(src.resolve())
            else:
                shutil.copy2(src, dst)


def wsss_run(name: str, run: Run, seed: int, args: argparse.Namespace) -> dict:
    """`wsss run` one run (resumes or skips what is done, reruns if a linked run changed); its manifest's stages."""
    out = Path(args.out)
    link_upstream(out, name, run.links, seed)
    state, record = upstream_state(out, run.links, seed), out / name / "links.json"
    changed = record.is_file() and json.loads(record.read_text()) != state
    if changed:
        print(f"{name}: a linked run changed since this run was made: rerunning it (--force)", flush=True)
    cmd = [sys.executable, "-m", "wsss", "run", *(["--force"] if changed else []), str(REPO / "configs" / run.recipe),
           f"data.root={args.data}",
           f"run.root={out}", f"run.name={name}", f"run.stages={run.stages}", f"{run.seed_key}={seed}",
           f"trainer.threads={args.threads}", f"seg.feature_cache.root={out / 'feature_cache'}",  # one cache for all rows
           *(o.replace("{out}", str(out)).replace("{seed}", str(seed)) for o in run.overrides), *args.set]
    with open(out / f"{name}.log", "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    if run.links:  # written after success only: a killed forced rerun is forced again
        atomic.write_json(record, state)
    return json.loads((out / name / "manifest.json").read_text())["stages"]


def pseudo_miou(out: Path, name: str) -> Optional[float]:
    """mIoU of the pseudo masks run `name` trained on (followed through its `pseudo` link), or of its cyclic round."""
    stages = json.loads((out / name / "manifest.json").read_text())["stages"]
    if "cyclic" in stages:
        return stages["cyclic"]["metrics"].get("r1_pseudo_miou")
    masks = out / name / "pseudo"
    if masks.is_symlink():
        return pseudo_miou(out, masks.resolve().parent.name)
    return stages.get("pseudo", {}).get("metrics", {}).get("pseudo_miou")


def row_numbers(out: Path, name: str, stages: dict) -> dict:
    """The table's numbers of one finished run (a cyclic run: its round's segmenter)."""
    train = stages["cyclic"]["metrics"]["r1_train"] if "cyclic" in stages else stages["train_seg"]["metrics"]
    best = train.get("holdout_best_miou")
    kept = train.get("holdout_last_miou") if train.get("kept") == "last" else best
    masks = pseudo_miou(out, name)  # None for GT and scribble rows
    return {"val": 100 * stages["evaluate"]["metrics"]["miou"],
            "seconds": sum(stages[s]["seconds"] for s in ("train_seg", "cyclic") if s in stages),
            "heldout": 100 * kept if kept is not None else float("nan"),
            "best": 100 * best if best is not None else float("nan"),
            "best_epoch": train.get("holdout_best_epoch", "-"), "stopped_epoch": train.get("stopped_at_epoch", "-"),
            "steps": train.get("steps", "-"), "masks": 100 * masks if masks is not None else None}


def progress(args: argparse.Namespace, table: Table) -> None:
    """Held-out mIoU per epoch of every run of the table so far, read from its metrics.csv."""
    print("| run | epochs | held-out mIoU by epoch (%) | best (epoch) | status |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        for row, spec in table.rows.items():
            run = Path(args.out) / run_name(args.table, row, spec, seed)
            for log in sorted(run.glob("seg*/logs/metrics.csv")):
                with open(log) as f:
                    curve = [float(r["holdout/miou"]) * 100 for r in csv.DictReader(f) if r.get("holdout/miou")]
                if not curve:
                    continue
                stages = json.loads((run / "manifest.json").read_text())["stages"]
                status = "evaluated" if stages.get("evaluate", {}).get("status") == "done" else \
                    next(v["status"] for k, v in stages.items() if k != "evaluate")
                best = max(range(len(curve)), key=curve.__getitem__)
                print(f"| {run.name}/{log.parent.parent.name} | {len(curve)} | {' '.join(f'{v:.1f}' for v in curve)} | "
                      f"{curve[best]:.2f} ({best + 1}) | {status} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES), default="scribbles")
    p.add_argument("--rows", nargs="*", default=None, help="a subset of the table's rows (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "bench_convergence"))
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--setup", nargs="*", default=None, help="a subset of the table's setup runs (default: all); "
                   "with `--rows` and no names, e.g. to make one shared run in its own process")
    p.add_argument("--setup-from", type=Path, default=None, help="another --out whose setup runs this --out reuses "
                   "where it has them (mirrored, large files linked; a stage whose config changed is rerun as usual)")
    p.add_argument("--progress", action="store_true", help="run nothing; print the held-out curves so far")
    args = p.parse_args()
    spec = TABLES[args.table]
    table = Table({k: v for k, v in spec.rows.items() if args.rows is None or k in args.rows},
                  {k: v for k, v in spec.setup.items() if args.setup is None or k in args.setup})
    if args.progress:
        return progress(args, table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, run in table.setup.items():  # shared CAMs and pseudo masks, once
        if args.setup_from is not None and (args.setup_from / name).is_dir() and not (Path(args.out) / name).exists():
            mirror_run(args.setup_from / name, Path(args.out) / name)
        stages = wsss_run(name, run, 0, args)
        pseudo = stages.get("pseudo", {}).get("metrics", {})
        quality = [f"{label} {100 * pseudo[key]:.2f}" for key, label in (
            ("cam_seed_miou", "CAM seed mIoU (best background threshold, train GT)"), ("pseudo_miou", "pseudo-mask mIoU"),
            ("labelled_fraction", "labelled %")) if key in pseudo]
        print(f"{name}: " + ", ".join(f"{s} {v['seconds']:.0f} s" for s, v in stages.items())
              + (f"; {', '.join(quality)}" if quality else ""), flush=True)
    results: dict[str, list[dict]] = {k: [] for k in table.rows}
    print("| row | seed | val mIoU | held-out mIoU (model) | best held-out mIoU (epoch) | stopped at epoch | steps | "
          "train s | masks mIoU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:  # seed-major: an interrupted table still has every row at the first seeds
        for row, run in table.rows.items():
            name = run_name(args.table, row, run, seed)
            r = row_numbers(Path(args.out), name, wsss_run(name, run, seed, args))
            results[row].append(r)
            masks = f"{r['masks']:.2f}" if r["masks"] is not None else "-"
            print(f"| {row} | {seed} | {r['val']:.2f} | {r['heldout']:.2f} | {r['best']:.2f} ({r['best_epoch']}) | "
                  f"{r['stopped_epoch']} | "
                  f"{r['steps']} | {r['seconds']:.0f} | {masks} |")
            sys.stdout.flush()
    print(f"\n| row | val mIoU, mean +- std ({len(args.seeds)} seeds) | held-out mIoU, mean | runs |")
    print("|---|---|---|---|")
    for row, rs in results.items():
        vals = [r["val"] for r in rs]
        spread = f" +- {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        print(f"| {row} | {statistics.mean(vals):.2f}{spread} | {statistics.mean(r['heldout'] for r in rs):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in vals)} |")


if __name__ == "__main__":
    main()
