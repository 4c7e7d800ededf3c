"""The regularized-loss family (issue 18): weight calibration and step-time overhead over pCE.

Losses: the DenseCRF loss (wsss/losses/densecrf_loss.py) and its siblings from Tang et al. (ECCV 2018):
normalized cut (ncut_loss.py), grid-CRF Potts (potts_loss.py), kernel cut = both (kernelcut_loss.py).

Parts (markdown tables on stdout):
  calib  weights of the normalized-cut and grid-Potts losses that give the same mean |dL/dlogits| as
         the DenseCRF loss at each recipe's (rloss-calibrated) weight, on S = softmax(4 x blurred
         one-hot GT) of real VOC crops (voc12mini: 320, voc12: 512) or shapes images (96), as the
         DenseCRF calibration of bench_scribbles.py. The papers' own weights for these losses are not
         available here (docs/methods/scribbles.md).
  speed  training step time at the voc12-mini scribble recipe's batch and crop (8, 320x320), same
         network and batch for every variant, interleaved round by round in one process (the load of
         the shared machine hits all alike); then each regulariser alone (forward + backward).

    nice -n 10 python benchmarks/bench_rloss.py --part calib
    nice -n 10 python benchmarks/bench_rloss.py --part speed --rounds 5 --threads 1

The regularisers (as `seg.loss.regularizer` builds them) are attached to the pCE recipe's segmenter;
the weights are the voc12mini recipes'.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scribbles as bs  # noqa: E402  (VOC crops, soft segmentations, the speed batch)

REPO = bs.REPO
VOC = bs.VOC

# Each setting: the DenseCRF loss as its recipe runs it (weight, sigma_xy, scale) -- the reference the
# other losses are matched to. sigma_rgb 15 everywhere.
SETTINGS = {
    "voc12mini (crop 320)": {"crop": 320, "crf_weight": 1.0e-7, "sigma_xy": 100.0, "source": "voc"},
    "voc12 (crop 512)": {"crop": 512, "crf_weight": 2.4e-8, "sigma_xy": 100.0, "source": "voc"},
    "shapes (crop 96)": {"crop": 96, "crf_weight": 3.2e-5, "sigma_xy": 20.0, "source": "shapes"},
}
SIGMA_RGB, SCALE = 15.0, 0.5


def _shapes(n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """n shapes training images (n, 3, 96, 96) 0..255, their masks (n, 96, 96) and the class count."""
    from wsss.config import load_recipe
    from wsss.data import build_dataset

    cfg = load_recipe(REPO / "configs" / "shapes_scribble_pce.yaml")
    ds = build_dataset(cfg.data, "train")
    ids = ds.ids[:n]
    imgs = torch.from_numpy(np.stack([ds.load_image(i) for i in ids])).permute(0, 3, 1, 2).float()
    masks = torch.from_numpy(np.stack([ds.load_mask(i) for i in ids]).astype(np.int64))
    return imgs, masks, len(ds.class_names)


def _mean_abs_grad(loss_fn, logits: torch.Tensor) -> float:
    """Mean over pixels and classes of |dL/dlogits| of loss_fn(softmax(logits))."""
    z = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(z.softmax(1)), z)
    return float(g.abs().mean())


def part_calib(args: argparse.Namespace) -> None:
    from wsss.losses.densecrf_loss import densecrf_loss
    from wsss.losses.ncut_loss import ncut_loss
    from wsss.losses.potts_loss import potts_loss

    print("\n## Weights of the normalized-cut and grid-Potts losses (same mean |dL/dlogits| as the DenseCRF loss)\n")
    print(f"S = softmax(4 x blurred one-hot GT); {args.calib_images} VOC val crops (16 shapes train images); "
          f"sigma_rgb {SIGMA_RGB}, dense kernels at scale {SCALE}, grid Potts 8-neighbour, KernelCut contrast (sigma^2 = mean |dI|^2), full resolution.\n")
    print("| setting | DenseCRF weight (recipe) | mean abs grad, DenseCRF x weight | mean abs grad, NC (unweighted) | "
          "NC value / image | NC weight | mean abs grad, Potts (unweighted) | Potts weight |")
    print("|---|---|---|---|---|---|---|---|")
    for name, st in SETTINGS.items():
        if st["source"] == "voc":
            imgs, masks = bs._voc_crops(args.calib_images, st["crop"])
            classes = 21
        else:
            imgs, masks, classes = _shapes(16)
        m = masks.clone()
        m[m == 255] = 0
        onehot = F.one_hot(m, classes).permute(0, 3, 1, 2).float()
        logits = 4.0 * F.avg_pool2d(onehot, 9, 1, 4, count_include_pad=False)
        roi = torch.ones_like(masks, dtype=torch.bool)
        sxy = st["sigma_xy"]
        g_crf = _mean_abs_grad(lambda p: st["crf_weight"] * densecrf_loss(p, imgs, roi, SIGMA_RGB, sxy, SCALE), logits)
        g_nc = _mean_abs_grad(lambda p: ncut_loss(p, imgs, roi, SIGMA_RGB, sxy, SCALE), logits)
        nc_val = float(ncut_loss(logits.softmax(1), imgs, roi, SIGMA_RGB, sxy, SCALE))
        g_pt = _mean_abs_grad(lambda p: potts_loss(p, imgs, roi, 8, None), logits)
        print(f"| {name} | {st['crf_weight']:.3g} | {g_crf:.4g} | {g_nc:.4g} | {nc_val:.3f} | {g_crf / g_nc:.3g} | "
              f"{g_pt:.4g} | {g_crf / g_pt:.3g} |", flush=True)


# ---- speed ------------------------------------------------------------------------------------

def _regularizers() -> dict:
    """name -> regulariser (None = pCE alone), with the voc12mini recipes' options."""
    import yaml
    from omegaconf import OmegaConf

    from wsss.config import load_recipe
    from wsss.losses.kernelcut_loss import KernelCutOptions, kernelcut
    from wsss.losses.ncut_loss import NCutOptions, ncut
    from wsss.losses.potts_loss import PottsOptions, potts
    from wsss.losses.regularized import densecrf

    def opts(name: str) -> dict:  # read as YAML: the recipe key seg.loss.regularizer is not in the schema yet
        return yaml.safe_load((REPO / "configs" / f"voc12mini_scribble_{name}.yaml").read_text())["seg"]["loss"][name]

    cfg = load_recipe(REPO / "configs" / "voc12mini_scribble_densecrf.yaml", [f"data.root={VOC}"])
    kc = opts("kernelcut")
    return {
        "pCE": None,
        "pCE + DenseCRF loss": densecrf(OmegaConf.to_object(cfg.seg.loss.densecrf)),
        "pCE + normalized cut": ncut(NCutOptions(**opts("ncut"))),
        "pCE + grid Potts (8-nb)": potts(PottsOptions(**opts("potts"))),
        "pCE + kernel cut": kernelcut(KernelCutOptions(NCutOptions(**kc["ncut"]), PottsOptions(**kc["potts"]))),
    }


def part_speed(args: argparse.Namespace) -> None:
    from wsss.config import load_recipe
    from wsss.stages.common import loss_spec, seg_method

    cfg = load_recipe(REPO / "configs" / "voc12mini_scribble_pce.yaml",
                      [f"data.root={VOC}", f"seg.batch_size={args.batch}", f"seg.crop_size={args.crop}"])
    batch = bs._speed_batch(cfg, args.batch)
    mods = {}
    for name, reg in _regularizers().items():
        torch.manual_seed(0)
        m = seg_method(cfg, [str(i) for i in range(21)], loss_spec(cfg))
        m.regularizer = reg  # what `seg.loss.regularizer: <name>` selects
        mods[name] = m
    times = bs.interleaved_step_times(mods, batch, args.rounds)
    base = statistics.median(times["pCE"])
    bs.print_speed_header(cfg, args)
    # Overheads three ways: medians, minima (least disturbed by the load), and the median over rounds of
    # the ratio to the pCE step of the same round (paired: a load change hits both steps of a round).
    print("| variant | median s/step | min | max | vs pCE (medians) | vs pCE (minima) | vs pCE (median paired ratio) |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        if name == "pCE":
            cols = "| | |"
        else:
            paired = statistics.median(t / b for t, b in zip(ts, times["pCE"]))
            cols = (f"{100 * (med / base - 1):+.0f}% | {100 * (min(ts) / min(times['pCE']) - 1):+.0f}% | "
                    f"{100 * (paired - 1):+.0f}% |")
        print(f"| {name} | {med:.2f} | {min(ts):.2f} | {max(ts):.2f} | {cols}")
    logits = torch.randn(args.batch, 21, args.crop, args.crop, requires_grad=True)
    out = {"logits": logits}
    print("\n| regulariser alone (forward + backward, fixed logits) | median s | min |")
    print("|---|---|---|")
    for name, m in mods.items():
        if m.regularizer is None:
            continue
        ts = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            loss, _ = m.regularizer(out, batch, 0)
            loss.backward()
            ts.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["calib", "speed", "all"], default="all")
    p.add_argument("--calib-images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)  # the voc12mini scribble recipe's batch and crop
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("calib", "all"):
        part_calib(args)
    if args.part in ("speed", "all"):
        part_speed(args)


if __name__ == "__main__":
    main()
