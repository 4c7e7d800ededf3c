"""What a trained segmenter predicts on a run's held-out images: how its pixels spread over classes.

Reads a run directory of `wsss run` (its config.yaml) and a network state: the last training
checkpoint (`--state last`, i.e. where training was when it stopped, not the exported best weights) or
the exported model (`--state model`). Predicts the first `--images` ids of `seg/holdout.txt` (the
convergence protocol's held-out part; train ids without it), or of val with `--split val`, at scale 1
and prints:
  - the mIoU over those images (one confusion matrix, as the evaluate stage),
  - the share of pixels predicted as each class, and in the ground truth,
  - the share of pixels predicted as a class that the image's ground truth contains (background
    counts when the image has background),
  - the mean maximum softmax probability and the mean entropy of the softmax (ln C = uniform).

    python benchmarks/inspect_segmenter.py /work/bench/conv2/scribbles_ncut_s0 --state last --images 12
    python benchmarks/inspect_segmenter.py /work/bench/conv2/scribbles_full_s0 --state last --split val --images 200

Written to explain a collapse (docs/methods/scribbles.md, the normalized cut on voc12-mini).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory (with config.yaml and seg/)")
    p.add_argument("--state", choices=("last", "model"), default="last")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split", choices=("holdout", "val"), default="holdout")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from wsss.config import load_recipe
    from wsss.engine.export import load_weights
    from wsss.engine.inference import segment_probs
    from wsss.metrics import ConfusionMatrix
    from wsss.stages.common import seg_method, split_dataset

    cfg = load_recipe(args.run / "config.yaml")
    ds = split_dataset(cfg, cfg.data.val_split if args.split == "val" else cfg.data.train_split)
    method = seg_method(cfg, ds.class_names)
    if args.state == "last":
        ckpt = torch.load(args.run / "seg" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        # strict=False: a checkpoint also holds the regulariser's parameters (DFR head), which inference lacks
        missing = method.load_state_dict(ckpt["state_dict"], strict=False).missing_keys
        if missing:
            raise SystemExit(f"{args.run}: the checkpoint lacks {len(missing)} tensors of this network, e.g. {missing[0]}")
        where = f"last checkpoint (epoch {ckpt['epoch']}, step {ckpt['global_step']})"
    else:
        load_weights(method.net, args.run / "seg", "seg", ds.class_names)
        where = "exported model"
    method.eval()
    holdout = args.run / "seg" / "holdout.txt"
    ids = (holdout.read_text().split() if holdout.is_file() and args.split == "holdout" else list(ds.ids))[:args.images]

    num_classes = len(ds.class_names)
    counts = np.zeros(num_classes)
    gt_counts = np.zeros(num_classes)
    in_image = max_prob = entropy = 0.0
    cm = ConfusionMatrix(num_classes)
    for sid in ids:
        with torch.no_grad():
            probs = segment_probs(method, ds.load_image(sid), scales=(1.0,), flip=False)  # (C, H, W)
        pred = probs.argmax(0).numpy()
        counts += np.bincount(pred.ravel(), minlength=num_classes)
        mask = ds.load_mask(sid)
        cm.update(pred, mask)
        gt_counts += np.bincount(mask[mask != 255].ravel(), minlength=num_classes)[:num_classes]
        present = [c for c in np.unique(mask) if c != 255]
        in_image += float(np.isin(pred, present).mean())
        max_prob += float(probs.max(0).values.mean())
        entropy += float(-(probs * probs.clamp_min(1e-12).log()).sum(0).mean())
    n = len(ids)
    print(f"{args.run.name}: {where}, {n} {'held-out' if args.split == 'holdout' else 'val'} images, "
          f"mIoU {100 * cm.compute(ds.class_names).miou:.2f}")
    share = counts / counts.sum()
    order = np.argsort(-share)
    print("predicted pixels by class: " + ", ".join(f"{ds.class_names[c]} {100 * share[c]:.1f}%" for c in order
                                                     if share[c] >= 0.005))
    gt_share = gt_counts / gt_counts.sum()
    print("ground truth by class: " + ", ".join(f"{ds.class_names[c]} {100 * gt_share[c]:.1f}%"
                                                 for c in np.argsort(-gt_share) if gt_share[c] >= 0.005))
    print(f"pixels predicted as a class the image contains: {100 * in_image / n:.1f}%")
    print(f"mean max probability {max_prob / n:.3f}; mean entropy {entropy / n:.3f} (uniform: ln {num_classes} = "
          f"{math.log(num_classes):.3f})")


if __name__ == "__main__":
    main()
