"""Scribble supervision benchmark: loss calibration, training-step speed, accuracy (pCE -> +DenseCRF -> DFR vs full).

All scribbles here are SIMULATED from ground-truth masks (wsss.data.scribble_sim): the synthetic `shapes`
set ships simulated scribbles, and voc12-mini (real VOC images) has no real scribbles, so its recipes
use `data.scribbles.source: simulate`. No number from this script is comparable with ScribbleSup results.

Parts (run separately with --part, or all by default; each prints markdown tables):
  calib     our lattice vs the exact dense Gaussian and vs densecrf's raw lattice (pydensecrf2 with
            NO_NORMALIZATION, the same Permutohedral code as rloss's bilateralfilter), and the DenseCRF
            loss weight in our units for each recipe (docs/methods/scribbles.md, "Calibration").
  speed     training step time at batch 8, 320x320, real VOC crops: pCE vs + DenseCRF loss vs DFR,
            same network (voc12mini recipes), same batches, interleaved rounds in one process.
  accuracy  `wsss run` of the recipes with the same budget per data set; val mIoU from each run's manifest.

    python benchmarks/bench_scribbles.py --part calib
    python benchmarks/bench_scribbles.py --part speed --rounds 5
    python benchmarks/bench_scribbles.py --part accuracy --sets shapes --root /tmp/bench_scribbles
    python benchmarks/bench_scribbles.py --part accuracy --sets voc12mini --voc-steps 120
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
VOC = REPO.parent / "shared" / "data" / "voc12-mini"
RLOSS = {"weight": 2e-9, "batch": 12, "crop": 513, "scale": 0.5, "sigma_xy": 100.0, "sigma_rgb": 15.0}
SCRIBBLE_FRACTION = 0.03  # labelled share of the crop (ScribbleSup ~3%; our simulator's target)


# ---- calibration ------------------------------------------------------------------------------

def _voc_crops(n: int, crop: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """n VOC images resized (short side = crop) and centre-cropped: images (n, 3, crop, crop) 0..255, masks (n, crop, crop)."""
    from PIL import Image

    root = VOC / "VOC2012"
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
    imgs, masks = [], []
    for i in ids:
        img = Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB")
        gt = Image.open(root / "SegmentationClass" / f"{i}.png")
        s = crop / min(img.size)
        size = (max(crop, round(img.width * s)), max(crop, round(img.height * s)))
        img, gt = img.resize(size, Image.BILINEAR), gt.resize(size, Image.NEAREST)
        left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
        box = (left, top, left + crop, top + crop)
        imgs.append(np.array(img.crop(box)))
        masks.append(np.array(gt.crop(box)))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float(), torch.from_numpy(np.stack(masks)).long()


def _shapes_images(n: int) -> torch.Tensor:
    from wsss.config import load_recipe
    from wsss.data import build_dataset

    cfg = load_recipe(REPO / "configs" / "shapes_scribble_pce.yaml")
    ds = build_dataset(cfg.data, "train")
    return torch.from_numpy(np.stack([ds.load_image(i) for i in ds.ids[:n]])).permute(0, 3, 1, 2).float()


def _soft_segmentation(mask: torch.Tensor, classes: int = 21) -> torch.Tensor:
    """A plausible softmax output: softmax(4 x blurred one-hot GT) -> (n, C, H, W)."""
    m = mask.clone()
    m[m == 255] = 0
    onehot = F.one_hot(m, classes).permute(0, 3, 1, 2).float()
    blur = F.avg_pool2d(onehot, 9, 1, 4, count_include_pad=False)
    return (4.0 * blur).softmax(1)


_COMPAT = 1e-4


def _pydensecrf_raw_message(img: np.ndarray, q1: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
    """densecrf's raw lattice applied to (Q1 - Q0) of a 2-label CRF: one iteration with NO_NORMALIZATION."""
    import pydensecrf.densecrf as dcrf

    h, w = q1.shape
    q = np.stack([1 - q1, q1]).astype(np.float32)
    u = -np.log(q)
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(np.ascontiguousarray(u.reshape(2, -1)))
    # A tiny Potts weight keeps the softmax away from saturation (the raw kernel mass is in the thousands).
    d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(img), compat=_COMPAT,
                           normalization=dcrf.NO_NORMALIZATION)
    out = np.array(d.inference(1), dtype=np.float64).reshape(2, h, w)
    # log(Q1/Q0) + (U1 - U0) = w (K Q1 - K Q0) with K the raw lattice
    return (np.log(out[1] / out[0]) + (u[1] - u[0])) / _COMPAT


def _row_mass(images: torch.Tensor, scale: float, sigma_xy: float, sigma_rgb: float) -> float:
    """Mean over pixels of (L 1): the raw lattice's kernel mass per pixel at the loss's resolution."""
    from wsss.crf.filters import bilateral_filter
    from wsss.losses.densecrf_loss import downscale

    ones = torch.ones(images.shape[0], 1, *images.shape[2:])
    roi = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool)
    ones, img, _ = downscale(ones, images, roi, scale)
    return float(bilateral_filter(img, ones, sigma_xy * scale, sigma_rgb).mean())


def _calib_exact(args: argparse.Namespace) -> None:
    """Our lattice vs the exact dense Gaussian and vs densecrf's raw lattice, at the training setting."""
    from wsss.crf.filters import bilateral_filter
    from wsss.losses.densecrf_loss import dense_bilateral_filter, densecrf_loss, downscale

    # (1) our lattice vs the exact dense Gaussian, and vs densecrf's raw lattice, at the training setting.
    imgs, masks = _voc_crops(args.calib_images, 320)
    probs = _soft_segmentation(masks)
    roi = torch.ones_like(masks, dtype=torch.bool)
    s = RLOSS["scale"]
    print(f"VOC val crops 320x320 -> loss at scale {s} (160x160), sigma_xy {RLOSS['sigma_xy']} x {s}, sigma_rgb {RLOSS['sigma_rgb']}, "
          f"S = softmax(4 x blurred one-hot GT), {args.calib_images} images\n")
    print("| image | loss, our lattice | loss, exact dense | lattice / exact | mass L1 / W1 | our lattice vs densecrf raw lattice: max abs diff (max abs value) |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for i in range(imgs.shape[0]):
        im, pr, ro = imgs[i:i + 1], probs[i:i + 1], roi[i:i + 1]
        ours = float(densecrf_loss(pr, im, ro, RLOSS["sigma_rgb"], RLOSS["sigma_xy"], s))
        exact = float(densecrf_loss(pr, im, ro, RLOSS["sigma_rgb"], RLOSS["sigma_xy"], s, kernel="exact"))
        ones, im_s, _ = downscale(torch.ones_like(pr[:, :1]), im, ro, s)
        mass_l = float(bilateral_filter(im_s, ones, RLOSS["sigma_xy"] * s, RLOSS["sigma_rgb"]).mean())
        mass_w = float(dense_bilateral_filter(im_s, ones, RLOSS["sigma_xy"] * s, RLOSS["sigma_rgb"]).mean())
        pr_s, _, _ = downscale(pr, im, ro, s)
        q1 = pr_s[0, 0].clamp(0.05, 0.95)  # background probability as a 2-label Q
        msg_ours = bilateral_filter(im_s, (q1 - (1 - q1))[None, None], RLOSS["sigma_xy"] * s, RLOSS["sigma_rgb"])[0, 0].double().numpy()
        try:
            msg_ref = _pydensecrf_raw_message(im_s[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy(), q1.numpy(),
                                              RLOSS["sigma_xy"] * s, RLOSS["sigma_rgb"])
            ref = f"{np.abs(msg_ours - msg_ref).max():.3g} ({np.abs(msg_ref).max():.4g}), ratio of sums {msg_ours.sum() / msg_ref.sum():.4f}"
        except ImportError:
            ref = "pydensecrf2 not installed"
        ratios.append(ours / exact)
        print(f"| {i} | {ours:.4g} | {exact:.4g} | {ours / exact:.3f} | {mass_l / mass_w:.3f} | {ref} |")
    print(f"\nlattice / exact over images: mean {np.mean(ratios):.3f}, min {np.min(ratios):.3f}, max {np.max(ratios):.3f}")


def part_calib(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    print("\n## Calibration of the DenseCRF loss\n")
    if not args.skip_exact:
        _calib_exact(args)
    # (2) weight in our units: keep rloss's ratio of per-pixel gradients (CRF term vs pCE term).
    print("\n### Loss weight in our units\n")
    print("rho = 2 lambda m s^2 n B_avg: m = kernel mass per pixel (mean L1 at the loss resolution), s = scale, "
          "n = labelled pixels per crop (3%), B_avg = rloss's extra division of pCE by the batch (12; ours: 1).\n")
    settings = {
        "rloss (VOC, crop 513, scale 0.5, sxy 100)": (lambda: _voc_crops(args.calib_images, 513)[0], 513, 0.5, 100.0, 15.0, RLOSS["batch"]),
        "voc12mini recipes (crop 320, scale 0.5, sxy 100)": (lambda: _voc_crops(args.calib_images, 320)[0], 320, 0.5, 100.0, 15.0, 1),
        "voc12 recipes (crop 512, scale 0.5, sxy 100)": (lambda: _voc_crops(args.calib_images, 512)[0], 512, 0.5, 100.0, 15.0, 1),
        "shapes recipes (crop 96, scale 0.5, sxy 20)": (lambda: _shapes_images(16), 96, 0.5, 20.0, 15.0, 1),
    }
    rows = {}
    for name, (load, crop, scale, sxy, srgb, bavg) in settings.items():
        m = _row_mass(load(), scale, sxy, srgb)
        n = SCRIBBLE_FRACTION * crop * crop
        rows[name] = (m, scale, n, bavg)
    m_r, s_r, n_r, b_r = rows[next(iter(rows))]
    rho = RLOSS["weight"] * m_r * s_r ** 2 * n_r * b_r
    print("| setting | kernel mass m | scale | labelled px n | weight keeping rloss's balance |")
    print("|---|---|---|---|---|")
    for name, (m, scale, n, bavg) in rows.items():
        lam = rho / (m * scale ** 2 * n * bavg)
        print(f"| {name} | {m:.1f} | {scale} | {n:.0f} | {lam:.3g} |")


# ---- speed ------------------------------------------------------------------------------------

def _speed_batch(cfg, n: int) -> dict[str, torch.Tensor]:
    from torch.utils.data import DataLoader

    from wsss.data import build_dataset
    from wsss.data.transforms import SegmentationSet, train_augment

    ds = build_dataset(cfg.data, cfg.data.train_split)
    torch.manual_seed(0)
    loader = DataLoader(SegmentationSet(ds, "scribble", train_augment(cfg.seg, with_masks=True)), batch_size=n, shuffle=False)
    return next(iter(loader))


def interleaved_step_times(mods: dict, batch: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per training step (forward, backward, SGD step) of each module on one batch: one warm-up
    step each (allocator, lattice code paths), then `rounds` rounds interleaved, so that load changes on
    the shared machine hit all variants alike."""
    opts = {}
    for name, m in mods.items():
        m.log = lambda *a, **k: None  # no trainer attached
        m.train()
        opts[name] = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step(name: str) -> float:
        m, opt = mods[name], opts[name]
        t0 = time.perf_counter()
        loss = m.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in mods}
    for name in mods:
        step(name)
    for _ in range(rounds):
        for name in mods:
            times[name].append(step(name))
    return times


def print_speed_header(cfg: Any, args: argparse.Namespace) -> None:
    """The speed table's title and setting line (network, threads, rounds, load)."""
    print(f"\n## Training step time, batch {args.batch}, {args.crop}x{args.crop}, real VOC crops (simulated scribbles)\n")
    print(f"Network: {cfg.seg.arch} / {cfg.seg.encoder.name} (voc12mini recipes), torch threads {torch.get_num_threads()}, "
          f"{args.rounds} interleaved rounds after one warm-up step each; load average at the end {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores.\n")


def part_speed(args: argparse.Namespace) -> None:
    from wsss.config import load_recipe
    from wsss.stages.common import loss_spec, seg_method

    common = [f"data.root={VOC}", f"seg.batch_size={args.batch}", f"seg.crop_size={args.crop}"]
    variants = {"pCE": "voc12mini_scribble_pce.yaml", "pCE + DenseCRF loss": "voc12mini_scribble_densecrf.yaml",
                "DFR (pCE + DenseCRF + deep kernel + head)": "voc12mini_scribble_dfr.yaml"}
    mods = {}
    batch = None
    for name, recipe in variants.items():
        cfg = load_recipe(REPO / "configs" / recipe, common)
        if batch is None:
            batch = _speed_batch(cfg, args.batch)
        torch.manual_seed(0)
        m = seg_method(cfg, [str(i) for i in range(21)], loss_spec(cfg))
        mods[name] = m
    times = interleaved_step_times(mods, batch, args.rounds)
    base = statistics.median(times["pCE"])
    print_speed_header(cfg, args)
    print("| variant | median s/step | min | max | vs pCE |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {min(ts):.2f} | {max(ts):.2f} | {'' if name == 'pCE' else f'+{100 * (med / base - 1):.0f}%'} |")
    # The losses alone (forward + backward of the regulariser on fixed logits), less noisy than whole steps.
    logits = torch.randn(args.batch, 21, args.crop, args.crop, requires_grad=True)
    feats = torch.randn(args.batch, 256, args.crop // 4, args.crop // 4, requires_grad=True)
    out = {"logits": logits, "features": feats}
    print("\n| regulariser alone (forward + backward) | median s | min |")
    print("|---|---|---|")
    for name in list(variants)[1:]:
        reg = mods[name].regularizer
        if hasattr(reg, "dfr"):  # the decoder of the voc12mini network has 256 channels
            assert reg.dfr.head.net[0].in_channels == 256
        ts = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            loss, _ = reg(out, batch, 10**6)
            loss.backward()
            ts.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} |")


# ---- accuracy ---------------------------------------------------------------------------------

SHAPES_RUNS = {
    # name: (recipe, overrides). One network for every row (the DFR recipe's ViT), so only the loss changes;
    # the budget (--shapes-epochs) is the same for all rows.
    "full supervision (GT masks, CE)": ("shapes_scribble_dfr.yaml", ["seg.labels=gt", "seg.loss.name=ce",
                                                                     "seg.loss.regularizer="]),
    "pCE": ("shapes_scribble_dfr.yaml", ["seg.loss.name=pce", "seg.loss.regularizer="]),
    "pCE + DenseCRF loss": ("shapes_scribble_dfr.yaml", ["seg.loss.regularizer=densecrf"]),
    "DFR": ("shapes_scribble_dfr.yaml", []),
}
VOC_RUNS = {
    "full supervision (GT masks, CE)": ("voc12mini_scribble_pce.yaml", ["seg.labels=gt", "seg.loss.name=ce"]),
    "pCE": ("voc12mini_scribble_pce.yaml", []),
    "pCE + DenseCRF loss": ("voc12mini_scribble_densecrf.yaml", []),
    "DFR": ("voc12mini_scribble_dfr.yaml", []),
}


def _run(recipe: str, overrides: list[str], name: str, root: Path) -> dict:
    cmd = [sys.executable, "-m", "wsss", "run", str(REPO / "configs" / recipe), f"run.root={root}", f"run.name={name}", *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"<!-- {name} failed: {res.stderr[-2000:]} -->", flush=True)
        return {"miou": float("nan"), "seconds": secs, "cmd": " ".join(cmd[2:])}
    manifest = json.loads((root / name / "manifest.json").read_text())
    m = manifest["stages"]["evaluate"]["metrics"]
    return {"miou": m["miou"], "seconds": secs, "cmd": " ".join(cmd[2:]), "train": manifest["stages"]["train_seg"]["metrics"]}


def _table(title: str, runs: dict[str, dict], pce: str, dense: str, full: str) -> None:
    print(f"\n## {title}\n")
    print("| run | val mIoU (%) | train + eval time (s) |")
    print("|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {100 * r['miou']:.1f} | {r['seconds']:.0f} |")
    if all(k in runs for k in (pce, dense, full)):
        gap = runs[full]["miou"] - runs[pce]["miou"]
        if gap > 0:
            print(f"\nShare of the pCE -> full-supervision gap closed by the DenseCRF loss: "
                  f"{100 * (runs[dense]['miou'] - runs[pce]['miou']) / gap:.0f}% (rloss, literature: about half).")
    print("\nCommands:\n")
    for name, r in runs.items():
        print(f"    {r['cmd']}")


def _selects(pattern: str, name: str, rows: dict) -> bool:
    """--only: a pattern equal to a row's name selects that row only, otherwise every row containing it."""
    p = pattern.lower()
    if any(p == r.lower() for r in rows):
        return p == name.lower()
    return p in name.lower()


def _run_rows(rows: dict, budget: list[str], prefix: str, root: Path, only: list[str]) -> dict:
    """Run every row (recipe + its overrides) with the same budget; rows named in `only` if given."""
    runs = {}
    for i, (name, (recipe, ov)) in enumerate(rows.items()):
        if only and not any(_selects(o, name, rows) for o in only):
            continue
        runs[name] = _run(recipe, [*budget, *ov], f"{prefix}_{i}", root)
        print(f"<!-- {name}: {runs[name]['miou']:.4f} in {runs[name]['seconds']:.0f} s -->", flush=True)
    return runs


def part_accuracy(args: argparse.Namespace) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if "shapes" in args.sets:
        data = [f"data.root={root / 'shapes_data'}", f"trainer.num_workers={args.workers}",
                f"seg.epochs={args.shapes_epochs}", f"trainer.threads={args.threads}"]
        runs = _run_rows(SHAPES_RUNS, data, "shapes", root, args.only)
        _table(f"Accuracy on `shapes` (scribbles simulated from GT; 300 train / 100 val, 96 px; tiny ViT from scratch "
               f"(shapes_scribble_dfr.yaml's network) for every row, {args.shapes_epochs} epochs of batch 16)",
               runs, "pCE", "pCE + DenseCRF loss", "full supervision (GT masks, CE)")
    if "voc12mini" in args.sets:
        budget = [f"data.root={VOC}", f"seg.max_steps={args.voc_steps}", f"seg.crop_size={args.voc_crop}",
                  f"seg.encoder.frozen_stages={args.voc_frozen}", f"trainer.num_workers={args.workers}",
                  f"trainer.threads={args.threads}"]
        runs = _run_rows(VOC_RUNS, budget, "voc12mini", root, args.only)
        _table(f"Accuracy on voc12-mini (real VOC images, scribbles SIMULATED from GT; 330 train / 200 val; "
               f"{args.voc_steps} steps of batch 8, crop {args.voc_crop}, frozen stages {args.voc_frozen})",
               runs, "pCE", "pCE + DenseCRF loss", "full supervision (GT masks, CE)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["calib", "speed", "accuracy", "all"], default="all")
    p.add_argument("--calib-images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--sets", nargs="+", default=["shapes", "voc12mini"], choices=["shapes", "voc12mini"])
    p.add_argument("--only", nargs="*", default=[], help="accuracy: run only these runs (a run's exact name, or a part of names)")
    p.add_argument("--root", default="/tmp/bench_scribbles")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shapes-epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="accuracy runs: torch threads (1 is faster on a busy 2-core machine)")
    p.add_argument("--skip-exact", action="store_true", help="calib: only the weight table (no exact dense kernel)")
    p.add_argument("--voc-steps", type=int, default=40)
    p.add_argument("--voc-crop", type=int, default=320)  # the crop the DenseCRF weight was calibrated for
    p.add_argument("--voc-frozen", type=int, default=4)
    args = p.parse_args()
    if args.part in ("calib", "all"):
        part_calib(args)
    if args.part in ("speed", "all"):
        part_speed(args)
    if args.part in ("accuracy", "all"):
        part_accuracy(args)


if __name__ == "__main__":
    main()
