"""Training speed of the CAM network and the segmenter of a recipe (iterations/s on this machine).

Times forward + backward + optimiser step on random batches of the recipe's batch size and crop,
after warm-up, for channels_last and the default memory format, so the numbers show what one
training step costs here and what the memory-format choice is worth.

    python benchmarks/bench_train.py configs/shapes_cam.yaml
    python benchmarks/bench_train.py configs/voc12mini_cam.yaml --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from wsss.config import load_recipe
from wsss.engine.trainer import sgd_with_groups
from wsss.models.cam_net import CAMNet
from wsss.models.segmenter import Segmenter


def time_steps(net: torch.nn.Module, new_params, train_cfg, batch: int, crop: int, num_classes: int, kind: str,
               steps: int, channels_last: bool) -> list[float]:
    """Seconds per optimiser step over `steps` steps (after 2 warm-up steps)."""
    net = net.train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = sgd_with_groups(net.parameters(), new_params, train_cfg)
    x = torch.randn(batch, 3, crop, crop)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if kind == "cam":
        y = (torch.rand(batch, num_classes - 1) < 0.2).float()
    else:
        y = torch.randint(0, num_classes, (batch, crop, crop))
    out = []
    for i in range(steps + 2):
        t = time.perf_counter()
        if kind == "cam":
            loss = F.multilabel_soft_margin_loss(net(x)["logits"], y)
        else:
            loss = F.cross_entropy(net(x)["logits"], y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe, args.overrides)
    from wsss.data import build_dataset

    num_classes = build_dataset(cfg.data, cfg.data.train_split).num_classes
    rows = []
    for kind in ("cam", "seg"):
        for cl in (True, False):
            torch.manual_seed(0)
            if kind == "cam":
                net = CAMNet(cfg.cam.backbone, num_classes - 1)
                train_cfg, name = cfg.cam, cfg.cam.backbone.name
            else:
                net = Segmenter(cfg.seg.arch, cfg.seg.encoder, num_classes, dict(cfg.seg.arch_kwargs))
                train_cfg, name = cfg.seg, f"{cfg.seg.arch}/{cfg.seg.encoder.name}"
            secs = time_steps(net, net.new_parameters(), train_cfg, train_cfg.batch_size, train_cfg.crop_size, num_classes,
                              kind, args.steps, cl)
            med = statistics.median(secs)
            rows.append((kind, name, train_cfg.batch_size, train_cfg.crop_size, "channels_last" if cl else "NCHW", med, 1 / med))
    print(f"training speed, recipe {args.recipe}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print("| network | model | batch | crop | memory format | s/step | it/s |\n|---|---|---|---|---|---|---|")
    for kind, name, b, c, fmt, s, its in rows:
        print(f"| {kind} | {name} | {b} | {c} | {fmt} | {s:.3f} | {its:.2f} |")


if __name__ == "__main__":
    main()
