"""CAM inference benchmark, on real VOC images (../shared/data/voc12-mini).

1. Speed: wsss's multi-scale + flip inference (`wsss.cam.infer.multiscale_cams`: up to --batch-size
   images of equal size and their flips share one forward per scale, inference_mode) with the torch
   engine (NCHW and channels_last) and the ONNX Runtime engine (`cam_infer.engine: onnxruntime`),
   against a naive loop (per image, per scale, per flip: one forward each), same network, same
   scales, same threads, interleaved group by group in one process. Prints images/s, the speed-up
   over the naive loop and the largest output difference.
2. Memory (--memory): peak RSS of the real `cam` stage (`python -m wsss.stages.cam`) over 50 vs
   500 images, each in its own process; streaming means the two are close.

    python benchmarks/bench_cam.py --images 40 --batch-size 1
    python benchmarks/bench_cam.py --memory-only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
VOC = REPO.parent / "shared" / "data" / "voc12-mini"


def _voc(n: int):
    from omegaconf import OmegaConf

    from wsss.config import DataConfig
    from wsss.data import build_dataset

    cfg = OmegaConf.structured(DataConfig)
    cfg.dataset, cfg.root = "voc12", str(VOC)
    ds = build_dataset(cfg, "train")
    ids = ds.ids[:n]
    return ds, [(ds.load_image(i), ds.load_labels(i)) for i in ids]


def _net(backbone: str, weights: str, os_: int):
    from omegaconf import OmegaConf

    from wsss.config import BackboneConfig
    from wsss.data.transforms import Normalizer
    from wsss.models.backbones import normalization
    from wsss.models.cam_net import CAMNet

    cfg = OmegaConf.structured(BackboneConfig(name=backbone, weights=weights, output_stride=os_))
    torch.manual_seed(0)
    return CAMNet(cfg, 20).eval(), Normalizer(*normalization(cfg))


@torch.no_grad()
def naive(net, norm, samples, scales, flip):
    """Per image, per scale, per flip: one forward each (the reference)."""
    out = []
    for img, labels in samples:
        x0 = norm(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float())
        h, w = x0.shape[-2:]
        present = torch.nonzero(torch.from_numpy(labels) > 0.5).flatten()
        acc = torch.zeros((len(present), h, w))
        for s in scales:
            x = x0 if s == 1.0 else F.interpolate(x0, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
            for flipped in ([False, True] if flip else [False]):
                xi = x.flip(-1) if flipped else x
                cam = F.relu(net(xi)["cams"])
                cam = cam.flip(-1) if flipped else cam
                acc += F.interpolate(cam[:, present], size=(h, w), mode="bilinear", align_corners=False)[0]
        acc = acc / (acc.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
        out.append(acc)
    return out


def ours(cam_fn, norm, samples, scales, flip, batch_size, channels_last=False):
    """wsss: images grouped by size, flips batched, one forward per scale per group."""
    from wsss.cam.infer import multiscale_cams

    by_size: dict = {}
    for k, (img, _) in enumerate(samples):
        by_size.setdefault(img.shape[:2], []).append(k)
    out = [None] * len(samples)
    for members in by_size.values():
        for i in range(0, len(members), batch_size):
            idx = members[i : i + batch_size]
            x = norm(torch.from_numpy(np.stack([samples[k][0] for k in idx])).permute(0, 3, 1, 2).float())
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = torch.from_numpy(np.stack([samples[k][1] for k in idx]))
            for k, (_, maps) in zip(idx, multiscale_cams(cam_fn, x, labels, scales, flip)):
                out[k] = maps
    return out


VARIANTS = {"naive": "naive loop (per image, scale, flip)", "ours_nchw": "wsss batched, torch NCHW",
            "ours_channels_last": "wsss batched, torch channels_last", "ours_onnxruntime": "wsss batched, ONNX Runtime"}


def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    _, samples = _voc(args.images)
    net, norm = _net(args.backbone, args.weights, args.output_stride)
    scales = [float(s) for s in args.scales.split(",")]
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    runs = {"naive": lambda some: naive(net, norm, some, scales, True),
            "ours_nchw": lambda some: ours(lambda t: net(t)["cams"], norm, some, scales, True, args.batch_size),
            "ours_channels_last": lambda some: ours(lambda t: net_cl(t)["cams"], norm, some, scales, True,
                                                    args.batch_size, channels_last=True)}
    export_seconds = None
    try:
        from wsss.cam.onnx_engine import onnx_cam_fn

        t = time.perf_counter()
        ort_fn = onnx_cam_fn(net, lambda t: net(t)["cams"], torch.get_num_threads())
        export_seconds = time.perf_counter() - t
        runs["ours_onnxruntime"] = lambda some: ours(ort_fn, norm, some, scales, True, args.batch_size)
    except RuntimeError as e:  # onnxruntime not installed
        print(f"skipping ONNX Runtime: {e}")
    # Interleaved: each group of equal-size images (the batches wsss makes) goes through every variant,
    # in an order that rotates from group to group, so a change in machine load hits all variants alike.
    by_size: dict = {}
    for img, labels in samples:
        by_size.setdefault(img.shape[:2], []).append((img, labels))
    groups = [members[i : i + args.batch_size] for members in by_size.values()
              for i in range(0, len(members), args.batch_size)]
    names = list(runs)
    for name in names:
        runs[name](samples[:2])  # warm-up (allocator, kernels)
    seconds = dict.fromkeys(names, 0.0)
    outputs: dict = {name: [] for name in names}
    for g, group in enumerate(groups):
        for name in names[g % len(names):] + names[: g % len(names)]:
            t = time.perf_counter()
            outputs[name] += runs[name](group)
            seconds[name] += time.perf_counter() - t
    results = {name: (seconds[name], outputs[name]) for name in names}
    sizes = {img.shape[:2] for img, _ in samples}
    report = {"images": len(samples), "distinct_sizes": len(sizes), "scales": scales, "flip": True,
              "backbone": args.backbone, "output_stride": args.output_stride, "threads": torch.get_num_threads(),
              "onnx_export_seconds": export_seconds, "img_per_s": {}, "speedup_vs_naive": {}, "max_abs_diff_vs_naive": {}}
    for name, (seconds, outputs) in results.items():
        report["img_per_s"][name] = len(samples) / seconds
        report["speedup_vs_naive"][name] = results["naive"][0] / seconds
        report["max_abs_diff_vs_naive"][name] = max(float((a - b).abs().max()) if a.numel() else 0.0
                                                    for a, b in zip(results["naive"][1], outputs))
    return report


def memory(args) -> dict:
    """Peak RSS of the cam stage over 50 and 500 images (each a fresh process)."""
    from wsss.config import load_recipe
    from wsss.engine.export import export_net
    from wsss.engine.rundir import RunDir

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a VOC tree of links (train + val ids in one list) so 500 images are available
        voc = Path(tmp) / "voc" / "VOC2012"
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
        for sub in ("JPEGImages", "SegmentationClass"):
            (voc / sub).symlink_to(VOC / "VOC2012" / sub)
        ids = [line for split in ("train", "val") for line in (VOC / "VOC2012/ImageSets/Segmentation" / f"{split}.txt").read_text().split()]
        (voc / "ImageSets" / "Segmentation" / "trainval.txt").write_text("\n".join(ids) + "\n")
        for n in (50, 500):
            overrides = [f"run.root={tmp}", f"run.name=mem{n}", f"data.root={voc}", "data.train_split=trainval",
                         f"data.max_images={n}", "cam_infer.scales=[1.0]", f"cam.backbone.name={args.backbone}",
                         f"cam.backbone.weights={args.weights}", f"cam.backbone.output_stride={args.output_stride}",
                         "trainer.num_workers=1", f"trainer.threads={args.threads}"]
            cfg = load_recipe(REPO / "configs" / "voc12mini_cam.yaml", overrides)
            rd = RunDir(cfg).prepare()
            net, _ = _net(args.backbone, args.weights, args.output_stride)
            from wsss.data.classes import VOC_CLASSES

            export_net(net, rd.sub("cam"), "cam", cfg.cam, VOC_CLASSES)
            code = ("import sys; sys.argv=['cam', %r] + %r; "
                    "from wsss.stages import cam; from wsss.pipeline import open_run; "
                    "cam.run(open_run(%r, %r)); "
                    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec (the parent's peak)
                    "print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])") % (
                        str(REPO / "configs" / "voc12mini_cam.yaml"), overrides, str(REPO / "configs" / "voc12mini_cam.yaml"), overrides)
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            peak = int(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("PEAK_KB")))
            out[n] = {"peak_rss_mb": peak / 1024, "seconds": time.perf_counter() - t}
    out["ratio_500_vs_50"] = out[500]["peak_rss_mb"] / out[50]["peak_rss_mb"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="efficientnet_lite0_pypi")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also measure peak memory of the cam stage, 50 vs 500 images")
    p.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    args = p.parse_args()
    if not VOC.is_dir():
        raise SystemExit(f"{VOC} not found")
    if args.memory_only:
        args.memory = True
    else:
        r = speed(args)
        print(json.dumps(r, indent=1))
        print(f"\nCAM inference, {r['images']} voc12-mini images ({r['distinct_sizes']} sizes), scales {r['scales']} + flip, "
              f"{r['backbone']} OS{r['output_stride']}, {r['threads']} torch/ORT threads, load average {os.getloadavg()[0]:.1f}")
        print("| method | images/s | speed-up vs naive | largest abs. difference vs naive (maps in [0, 1]) |\n|---|---|---|---|")
        for name, label in VARIANTS.items():
            if name in r["img_per_s"]:
                print(f"| {label} | {r['img_per_s'][name]:.3f} | {r['speedup_vs_naive'][name]:.2f}x | "
                      f"{r['max_abs_diff_vs_naive'][name]:.1e} |")
        if r["onnx_export_seconds"] is not None:
            print(f"(ONNX export + session creation, once per stage: {r['onnx_export_seconds']:.1f} s, not in the times above)")
    if args.memory:
        m = memory(args)
        print(json.dumps(m, indent=1))
        print(f"\npeak RSS of the cam stage: 50 images {m[50]['peak_rss_mb']:.0f} MB, 500 images {m[500]['peak_rss_mb']:.0f} MB "
              f"(ratio {m['ratio_500_vs_50']:.3f})")


if __name__ == "__main__":
    main()
