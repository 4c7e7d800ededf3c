"""Saliency maps on voc12-mini train: the bundled network raw vs flip / letterbox scale / tiles vs + dense CRF.

    nice -n 10 python benchmarks/bench_saliency.py cache [--limit N]    # network views, one .npz per image
    nice -n 10 python benchmarks/bench_saliency.py eval  [--limit N]    # combinations (+ CRF), scores, timings

Images: the 330 ids of voc12-mini train, in the order of a fixed permutation (numpy seed 0), so that
`--limit N` is a fixed random subset. Every third image of that order (positions 0, 3, 6, ...) is the
TUNE part where defaults are chosen; the rest is the REPORT part. Val is never used.
Views cached per image (float16): the whole image letterboxed at scale 1 (`raw`), its mirror (`flip`),
at letterbox scale 0.75 (`s075`), and the tile map at 2 x 224 (`tiles2`: 224-px windows, stride 112).
Timings are single-thread (ONNX Runtime intra-op 1, torch 1) on a shared 2-core CPU: the CPU is
shared with other jobs, so seconds are upper bounds of an idle machine.
Scores: wsss.saliency.metrics (MAE, max F with beta^2 = 0.3, foreground IoU at 0.5 over summed
intersections / unions); GT foreground = any non-background class, 255 ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "voc12-mini" / "VOC2012"
CACHE = ROOT / ".cache" / "bench_saliency"
VIEWS = ("raw", "flip", "s075", "tiles2")


def ordered_ids() -> list[str]:
    ids = sorted((DATA / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
    return [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]


def load(sid: str) -> tuple[np.ndarray, np.ndarray]:
    from wsss.io.images import read_image, read_index_png

    return read_image(DATA / "JPEGImages" / f"{sid}.jpg"), read_index_png(DATA / "SegmentationClass" / f"{sid}.png", 21)


def cache(limit: int, views: tuple[str, ...]) -> None:
    """Compute the missing `views` of the first `limit` images; each image's .npz grows view by view."""
    from wsss.saliency.model import SaliencyNet, preprocess, unletterbox
    from wsss.saliency.refine import tile_map

    net = SaliencyNet(threads=1)
    CACHE.mkdir(parents=True, exist_ok=True)

    def letterboxed(image: np.ndarray, scale: float) -> np.ndarray:
        x, box = preprocess(image, scale)
        return unletterbox(net.forward(x[None])[0], box, image.shape[:2])

    make = {"raw": lambda im: letterboxed(im, 1.0),
            "flip": lambda im: letterboxed(np.ascontiguousarray(im[:, ::-1]), 1.0)[:, ::-1],
            "s075": lambda im: letterboxed(im, 0.75),
            "tiles2": lambda im: tile_map(net, im, 2)}
    for n, sid in enumerate(ordered_ids()[:limit]):
        out = CACHE / f"{sid}.npz"
        maps, secs = {}, {}
        if out.is_file():
            z = np.load(out)
            maps = {k: z[k] for k in z.files if k != "secs"}
            secs = json.loads(str(z["secs"]))
        todo = [v for v in views if v not in maps]
        if not todo:
            continue
        image, _ = load(sid)
        for v in todo:
            t = time.perf_counter()
            maps[v] = make[v](image).astype(np.float16)
            secs[v] = time.perf_counter() - t
        tmp = CACHE / f".tmp-{sid}.npz"
        np.savez(tmp, secs=json.dumps(secs), **maps)
        tmp.replace(out)
        print(f"{n + 1}/{limit} {sid} " + " ".join(f"{k} {secs[k]:.2f}s" for k in todo), flush=True)


# name -> (views averaged for the whole image, tile weight, CRF)
COMBOS = {
    "raw network": (("raw",), 0.0, False),
    "+ flip": (("raw", "flip"), 0.0, False),
    "+ scale 0.75": (("raw", "s075"), 0.0, False),
    "+ flip + tiles x2": (("raw", "flip"), 0.5, False),
    "raw + CRF": (("raw",), 0.0, True),
    "+ flip + CRF": (("raw", "flip"), 0.0, True),
    "+ flip + tiles x2 + CRF": (("raw", "flip"), 0.5, True),
}


def evaluate(limit: int, crf_iters: tuple[int, ...], rows: str = "all", only: tuple[str, ...] = ()) -> None:
    import torch

    from wsss.crf.presets import PRESETS
    from wsss.saliency.metrics import SaliencyMeter
    from wsss.saliency.refine import crf_saliency

    torch.set_num_threads(1)
    ids = ordered_ids()[:limit]
    missing = [sid for sid in ids if not (CACHE / f"{sid}.npz").is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} of the first {limit} images are not cached yet (e.g. {missing[0]}): run the cache phase")
    parts = {"tune": ids[0::3], "report": [s for i, s in enumerate(ids) if i % 3], "all": ids}
    combos = dict(COMBOS)
    for it in crf_iters:  # the preset runs 1 mean-field iteration (AuxSegNet); more iterations as a variant
        if it != PRESETS["auxsegnet_sal"].iterations:
            combos[f"+ flip + CRF ({it} iterations)"] = (("raw", "flip"), 0.0, it)
    if rows != "all":  # "tiles": only the rows with tiles (and the raw row to compare with); "no-tiles": the others
        keep = ("raw network", "+ flip", "+ flip + CRF") if rows == "tiles" else ()
        combos = {k: v for k, v in combos.items() if (v[1] > 0) == (rows == "tiles") or k in keep}
    if only:  # run some rows in separate processes (the CRF rows are the slow part)
        unknown = set(only) - set(combos)
        if unknown:
            raise SystemExit(f"--only: unknown rows {sorted(unknown)}; rows are {list(combos)}")
        combos = {k: v for k, v in combos.items() if k in only}
    meters = {(c, p): SaliencyMeter(0.5) for c in combos for p in parts}
    net_secs = {v: [] for v in VIEWS}
    crf_secs: dict[str, list[float]] = {}
    for sid in ids:
        z = np.load(CACHE / f"{sid}.npz")
        for k, v in json.loads(str(z["secs"])).items():
            net_secs[k].append(v)
        image, gt = load(sid)
        for name, (views, tw, crf) in combos.items():
            if tw and "tiles2" not in z.files:
                raise SystemExit(f"{sid}: tiles2 not cached; run `cache --views tiles2 --limit {limit}` or use --rows no-tiles")
            sal = np.mean([z[v].astype(np.float32) for v in views], axis=0)
            if tw:
                sal = (1 - tw) * sal + tw * z["tiles2"].astype(np.float32)
            sal = np.clip(sal, 0, 1)
            if crf:
                params = PRESETS["auxsegnet_sal"]
                if crf is not True:
                    from dataclasses import replace
                    params = replace(params, iterations=int(crf))
                t = time.perf_counter()
                sal = crf_saliency(image, sal, params)
                crf_secs.setdefault(name, []).append(time.perf_counter() - t)
            sal = np.rint(sal * 255) / 255  # scored as the stage writes it: 8-bit
            for p, members in parts.items():
                if sid in members:
                    meters[(name, p)].update(sal, gt)
    med = {k: float(np.median(v)) for k, v in net_secs.items() if v}
    print(f"images: {len(ids)} (tune {len(parts['tune'])}, report {len(parts['report'])}); "
          "network seconds per view (median, 1 thread): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    print("| variant | part | MAE | max F (beta^2=0.3) | fg IoU @0.5 | s/image (1 thread) |")
    print("|---|---|---|---|---|---|")
    for name, (views, tw, crf) in combos.items():
        secs = sum(med[v] for v in views) + (med["tiles2"] if tw else 0.0) + (float(np.median(crf_secs[name])) if crf else 0.0)
        for p in parts:
            r = meters[(name, p)].result()
            print(f"| {name} | {p} ({r.images}) | {r.mae:.4f} | {r.max_f:.4f} | {100 * r.fg_iou:.2f} | {secs:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["cache", "eval"])
    ap.add_argument("--limit", type=int, default=330)
    ap.add_argument("--views", default=",".join(VIEWS), help="cache: which views to compute (comma-separated)")
    ap.add_argument("--rows", choices=["all", "tiles", "no-tiles"], default="all", help="eval: which variants")
    ap.add_argument("--only", default="", help="eval: only these rows, separated by ';' (e.g. 'raw network;+ flip')")
    ap.add_argument("--crf-iters", default="1,5", help="CRF iterations to compare (the preset's 1 plus variants)")
    args = ap.parse_args()
    if args.phase == "cache":
        cache(args.limit, tuple(v for v in args.views.split(",") if v))
    else:
        evaluate(args.limit, tuple(int(i) for i in args.crf_iters.split(",") if i), args.rows,
                 tuple(r.strip() for r in args.only.split(";") if r.strip()))


if __name__ == "__main__":
    main()
