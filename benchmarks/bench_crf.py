"""Dense CRF speed, memory and label agreement: wsss.crf (PyTorch) vs pydensecrf2, same run, same machine.

    python benchmarks/bench_crf.py [--limit N] [--preset irn] [--threads 1 2] [--passive] [--active-limit N]

For each thread setting a fresh subprocess runs all images, alternating which implementation goes
first on each image, and reports median wall time (and CPU time) per image for 21 and 2 labels,
plus label agreement. pydensecrf is single-threaded. Peak memory (ru_maxrss) is measured in
separate subprocesses that run only one implementation on the largest images.
Unaries: 21 labels = softmax of 4 x smoothed one-hot ground truth + 1.5 x smooth noise; 2 labels =
PPMG-style [(1 - v)^11, v] from a smoothed foreground map plus noise (as tests/test_crf_pydensecrf.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "voc12-mini" / "VOC2012"


def _noise(rng: np.random.Generator, shape: tuple[int, ...], cell: int) -> np.ndarray:
    from scipy.ndimage import zoom

    h, w = shape[-2:]
    coarse = rng.normal(size=shape[:-2] + ((h + cell - 1) // cell + 1, (w + cell - 1) // cell + 1))
    return zoom(coarse, (1,) * (len(shape) - 2) + (cell, cell), order=1)[..., :h, :w]


def probs_21(gt: np.ndarray, seed: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = np.where(gt == 255, 0, gt)
    onehot = np.stack([gaussian_filter((g == k).astype(np.float32), 8) for k in range(21)])
    logits = 4.0 * onehot + 1.5 * _noise(rng, onehot.shape, 16)
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def probs_2(gt: np.ndarray, seed: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    fg = ((gt > 0) & (gt < 255)).astype(np.float32)
    v = np.clip(0.9 * gaussian_filter(fg, 10) + 0.15 * _noise(rng, fg.shape, 32), 0, 1)
    return np.stack([(1 - v) ** 11, v]).astype(np.float32)


def load(data: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    img = np.array(Image.open(data / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
    gt = np.array(Image.open(data / "SegmentationClass" / f"{image_id}.png"))
    return img, gt


def run_ref(img: np.ndarray, probs: np.ndarray, p) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
    d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=np.ascontiguousarray(img), compat=p.bilateral_compat)
    return np.array(d.inference(p.iterations), dtype=np.float32).reshape(c, h, w)


def run_ours(img: np.ndarray, probs: np.ndarray, p) -> np.ndarray:
    import torch

    from wsss.crf import dense_crf

    return dense_crf(img, torch.from_numpy(probs), p).numpy()


def timed(fn, *args) -> tuple[np.ndarray, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def worker(args: argparse.Namespace) -> None:
    """One subprocess: all images with a fixed torch thread count; prints one JSON line."""
    import torch

    from wsss.crf import PRESETS

    torch.set_num_threads(args.threads_one)
    p = PRESETS[args.preset]
    ids = (args.data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[: args.limit]
    rec = {k: [] for k in ("ref21", "ours21", "ref2", "ours2", "cref21", "cours21", "cref2", "cours2", "agree21", "agree2")}
    sizes = []
    warm = load(args.data, ids[0])
    run_ours(warm[0], probs_2(warm[1], 0), p)  # imports and first-call setup are not timed
    for n, image_id in enumerate(ids):
        img, gt = load(args.data, image_id)
        sizes.append(img.shape[0] * img.shape[1])
        for labels, make in (("21", probs_21), ("2", probs_2)):
            probs = make(gt, n)
            order = (("ref", run_ref), ("ours", run_ours)) if n % 2 == 0 else (("ours", run_ours), ("ref", run_ref))
            outs = {}
            for name, fn in order:
                outs[name], wall, cpu = timed(fn, img, probs, p)
                rec[name + labels].append(wall)
                rec["c" + name + labels].append(cpu)
            rec["agree" + labels].append(float((outs["ref"].argmax(0) == outs["ours"].argmax(0)).mean()))
    rec["threads"] = torch.get_num_threads()
    rec["mean_pixels"] = float(np.mean(sizes))
    print(json.dumps(rec))


def memory_worker(args: argparse.Namespace) -> None:
    """One subprocess running only one implementation on the largest images; prints peak RSS (MiB)."""
    import torch

    from wsss.crf import PRESETS

    torch.set_num_threads(args.threads_one)
    p = PRESETS[args.preset]
    ids = (args.data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[: args.limit]
    fn = run_ours if args.impl == "ours" else run_ref
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for image_id in ids[: args.mem_images]:
        img, gt = load(args.data, image_id)
        fn(img, probs_21(gt, 0), p)
        fn(img, probs_2(gt, 0), p)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "before_mib": base / 1024}))


def _sub(args: argparse.Namespace, mode: str, threads: int, impl: str = "", env_extra: dict | None = None,
         limit: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--_mode", mode, "--_threads", str(threads), "--preset", args.preset,
           "--data", str(args.data), "--mem-images", str(args.mem_images)]
    limit = limit or args.limit
    if limit:
        cmd += ["--limit", str(limit)]
    if impl:
        cmd += ["--_impl", impl]
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="only the first N val images (default: all 200)")
    ap.add_argument("--preset", default="irn", help="CRF preset (wsss.crf.presets), default irn")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to try")
    ap.add_argument("--passive", action="store_true", help="also run the largest thread count with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--mem-images", type=int, default=5, help="images per peak-memory subprocess")
    ap.add_argument("--active-limit", type=int, default=None,
                    help="image limit for multi-thread runs with OpenMP's default (active) waiting, which are "
                         "several times slower on an oversubscribed machine")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--_mode", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--_threads", dest="threads_one", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--_impl", dest="impl", default="ours", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._mode == "worker":
        return worker(args)
    if args._mode == "memory":
        return memory_worker(args)

    import torch

    from wsss.crf import PRESETS

    print(f"# bench_crf: preset {args.preset} = {PRESETS[args.preset]}")
    print(f"# python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    runs = [(t, {}) for t in args.threads]
    if args.passive:
        runs.append((max(args.threads), {"OMP_WAIT_POLICY": "PASSIVE"}))
    rows = []
    for threads, env in runs:
        limit = args.limit
        if threads > 1 and not env and args.active_limit:
            limit = min(limit or args.active_limit, args.active_limit)
        r = _sub(args, "worker", threads, env_extra=env, limit=limit)
        label = f"{r['threads']}" + (" (OMP passive)" if env else "")
        for lab in ("21", "2"):
            ref, ours = statistics.median(r["ref" + lab]), statistics.median(r["ours" + lab])
            cref, cours = statistics.median(r["cref" + lab]), statistics.median(r["cours" + lab])
            agree = r["agree" + lab]
            rows.append((lab, label, ref, ours, ref / ours, cref, cours, float(np.mean(agree)), float(np.min(agree)), len(agree)))
        print(f"# done: torch threads {label}, {len(r['ours21'])} images, mean {r['mean_pixels']:.0f} px, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print()
    print("| labels | torch threads | pydensecrf2 s/img (1 thread) | ours s/img | speed-up | CPU s/img ref | CPU s/img ours "
          "| label agreement mean | min | images |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lab, label, ref, ours, ratio, cref, cours, am, amin, n in rows:
        print(f"| {lab} | {label} | {ref:.3f} | {ours:.3f} | {ratio:.2f}x | {cref:.3f} | {cours:.3f} | {am:.5f} | {amin:.5f} | {n} |")
    print()
    print("| peak RSS (subprocess, 21 + 2 labels on the first images) | MiB |")
    print("|---|---|")
    for impl, threads in (("ref", 1), ("ours", 1), ("ours", max(args.threads))):
        m = _sub(args, "memory", threads, impl)
        name = "pydensecrf2" if impl == "ref" else f"wsss.crf, {threads} thread(s)"
        print(f"| {name}, {args.mem_images} images | {m['peak_mib']:.0f} (interpreter + imports before: {m['before_mib']:.0f}) |")


if __name__ == "__main__":
    main()
