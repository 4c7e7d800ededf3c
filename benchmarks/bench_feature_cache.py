"""Frozen-encoder feature cache (issue 16, part 1): step time, fill cost, disk, and accuracy of both paths.

Parts (markdown tables on stdout):
  speed     training step time of the voc12-mini scribble recipes (DeepLabV3+ on a frozen EfficientNet-Lite0,
            batch 8, 320 px crops, the recipe's 2 loader workers): reading images (the encoder runs every
            step) vs reading the cache, interleaved round by round in one process, data loading included.
            Also the decoder's share: the encoder's forward alone on the same batch.
  accuracy  the real stage (`wsss run ... run.stages=[train_seg,evaluate]`) with and without the cache at the
            same number of steps and seeds: val mIoU, stage seconds, the one-off fill time and the cache's
            size on disk (the whole voc12-mini train split).
  validation
            one epoch's held-out validation (the convergence protocol's 66 held-out images, full size, single
            scale): the encoder run for every image (as before) vs each image's frozen-encoder features kept
            from the first epoch (EncoderMemo), epochs 2.. interleaved; the ratio and the memo's memory.

    nice -n 10 python benchmarks/bench_feature_cache.py --part speed --rounds 3 --steps 5
    nice -n 10 python benchmarks/bench_feature_cache.py --part accuracy --steps 150 --seeds 0 1
    nice -n 10 python benchmarks/bench_feature_cache.py --part validation --rounds 3 --threads 1

Needs voc12-mini (../shared/data/voc12-mini or --data).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "voc12-mini"


def _module_and_sets(recipe: str, data: Path, cache_dir: Path, images: int):
    """The recipe's training module, its image-path set and its cached set over the first `images` train images."""
    from wsss.config import load_recipe
    from wsss.data.transforms import SegmentationSet, train_augment
    from wsss.stages.common import loss_spec, seg_method, split_dataset
    from wsss.data.feature_crops import CachedFeatureSet
    from wsss.engine.feature_cache import cache_layout, fill_feature_cache

    cfg = load_recipe(REPO / "configs" / recipe, [f"data.root={data}", f"data.max_images={images}"])
    ds = split_dataset(cfg, cfg.data.train_split)
    module = seg_method(cfg, ds.class_names, loss_spec(cfg))
    images_set = SegmentationSet(ds, cfg.seg.labels, train_augment(cfg.seg, with_masks=True, seed=0))
    layout = cache_layout(module, cfg.seg.feature_cache.scales, cfg.seg.scale_range, cfg.seg.hflip)
    start = time.perf_counter()
    fill_feature_cache(module.cacheable_encoder(), module.norm, ds, ds.ids, cache_dir, layout, {}, torch.device("cpu"),
                       channels_last=module.channels_last)
    fill = (time.perf_counter() - start) / len(ds)
    cached_set = CachedFeatureSet(images_set, cache_dir, layout, cfg.seg.crop_size, seed=0)
    return cfg, module, images_set, cached_set, fill


def _loader(dataset, cfg):
    from wsss.engine.trainer import train_loader

    return itertools.cycle(train_loader(dataset, cfg.seg.batch_size, cfg.trainer.num_workers, 0))


def _step(module, opt, batch) -> float:
    """One optimiser step on a batch; seconds."""
    start = time.perf_counter()
    loss, _ = module.loss(module.prepare(batch["image"]), batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print("| recipe | s/step, images | s/step, cache | speed-up | encoder forward alone, s | s/epoch (264 images), images | s/epoch, cache | fill, s/image |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, module, images_set, cached_set, fill = _module_and_sets(recipe, args.data, Path(tmp), args.images)
            module.train()
            opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            paths = {"images": _loader(images_set, cfg), "cache": _loader(cached_set, cfg)}
            times: dict[str, list[float]] = {k: [] for k in paths}
            for r in range(args.rounds):
                for name, it in paths.items():
                    for s in range(args.steps):
                        start = time.perf_counter()
                        batch = next(it)
                        wait = time.perf_counter() - start
                        took = _step(module, opt, batch) + wait
                        if r or s:  # the first step of the run warms up allocators and workers
                            times[name].append(took)
            batch = next(paths["images"])
            enc = []
            with torch.no_grad():
                for _ in range(3):
                    start = time.perf_counter()
                    module.cacheable_encoder()(module.prepare(batch["image"]))
                    enc.append(time.perf_counter() - start)
            img, cache = statistics.median(times["images"]), statistics.median(times["cache"])
            per_epoch = -(-264 // cfg.seg.batch_size)
            print(f"| {recipe} | {img:.2f} | {cache:.2f} | {img / cache:.2f}x | {statistics.median(enc):.2f} | "
                  f"{img * per_epoch:.0f} | {cache * per_epoch:.0f} | {fill:.2f} |")
            sys.stdout.flush()


def accuracy(args: argparse.Namespace) -> None:
    print("| recipe | seed | path | steps | val mIoU | train_seg s | fill s | cache MB |")
    print("|---|---|---|---|---|---|---|---|")
    root = Path(args.out)
    for recipe, seed in itertools.product(args.recipes, args.seeds):
        for path in ("images", "cache"):
            name = f"{Path(recipe).stem}_{path}_s{seed}"
            cmd = [sys.executable, "-m", "wsss", "run", str(REPO / "configs" / recipe), f"data.root={args.data}",
                   f"run.root={root}", f"run.name={name}", "run.stages=[train_seg,evaluate]",
                   f"seg.max_steps={args.steps}", f"trainer.seed={seed}", f"trainer.threads={args.threads}",
                   f"seg.feature_cache.enabled={'true' if path == 'cache' else 'false'}", *args.set]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            stages = json.loads((root / name / "manifest.json").read_text())["stages"]
            train = stages["train_seg"]
            cache = train["metrics"].get("feature_cache", {})
            print(f"| {recipe} | {seed} | {path} | {train['metrics']['steps']} | "
                  f"{100 * stages['evaluate']['metrics']['miou']:.2f} | {train['seconds']:.0f} | "
                  f"{cache.get('seconds', '-')} | {cache.get('megabytes', '-')} |")
            sys.stdout.flush()


def validation(args: argparse.Namespace) -> None:
    from wsss.config import load_recipe
    from wsss.data.transforms import InferenceSet
    from wsss.engine.inference import segment_probs
    from wsss.stages.common import holdout_split, seg_method, split_dataset

    torch.set_num_threads(args.threads)
    print("| recipe | images | s/epoch, encoder every epoch | s/epoch, memo | speed-up | memo's first epoch (fills it), s "
          "| memo MB | same predictions |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        cfg = load_recipe(REPO / "configs" / recipe, [f"data.root={args.data}"])
        _, held = holdout_split(split_dataset(cfg, cfg.data.train_split), cfg.seg.convergence.holdout)
        samples = [InferenceSet(held, held.ids, ("image",))[i] for i in range(len(held.ids))]
        module = seg_method(cfg, held.class_names).eval()
        memo = module.validation_reader()  # what validation during training predicts with
        readers = {"plain": module, "memo": memo}  # plain: what validation ran before the memo
        times: dict[str, list[float]] = {k: [] for k in readers}
        preds: dict[str, list[torch.Tensor]] = {k: [] for k in readers}
        for r in range(args.rounds + 1):  # round 0 fills the memo and warms the plain path up
            for name, reader in readers.items():
                start = time.perf_counter()
                for sample in samples:
                    memo.key = sample["id"]
                    pred = segment_probs(reader, sample["image"]).argmax(0)
                    if r == 0:
                        preds[name].append(pred)
                times[name].append(time.perf_counter() - start)
        plain, cached = statistics.median(times["plain"][1:]), statistics.median(times["memo"][1:])
        same = all(torch.equal(a, b) for a, b in zip(preds["plain"], preds["memo"]))
        print(f"| {recipe} | {len(samples)} | {plain:.1f} | {cached:.1f} | {plain / cached:.2f}x | {times['memo'][0]:.1f} | "
              f"{memo.bytes / 2**20:.1f} | {same} |")
        sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "accuracy", "validation"), required=True)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--recipes", nargs="+", default=["voc12mini_scribble_pce.yaml", "voc12mini_scribble_densecrf.yaml"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="speed: steps per path per round; accuracy: steps per run")
    p.add_argument("--images", type=int, default=48, help="speed: train images cached and read")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=str(REPO / "runs" / "bench_feature_cache"))
    p.add_argument("--set", nargs="*", default=[], help="accuracy: extra recipe overrides")
    args = p.parse_args()
    {"speed": speed, "accuracy": accuracy, "validation": validation}[args.part](args)


if __name__ == "__main__":
    main()
