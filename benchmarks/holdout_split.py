"""The convergence protocol's held-out part of voc12-mini train (docs/protocol.md): sizes and classes.

    python benchmarks/holdout_split.py [--data PATH] [--fraction F]

Prints the number of images in the training part, the held-out part and val, the images per class in
each (a class counts once per image whose mask has it), and a SHA-256 of the held-out id list so a
change of the split is visible. Reads masks only; trains nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "voc12-mini"


def main() -> None:
    import numpy as np

    from wsss.config import load_recipe
    from wsss.stages.common import holdout_split, split_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="the voc12-mini folder (holds VOC2012/)")
    parser.add_argument("--fraction", type=float, default=None, help="default: the recipe's seg.convergence.holdout")
    args = parser.parse_args()
    overrides = [f"data.root={args.data}"] + ([f"seg.convergence.holdout={args.fraction}"] if args.fraction is not None else [])
    cfg = load_recipe(ROOT / "configs" / "voc12mini_cam.yaml", overrides)
    train, held = holdout_split(split_dataset(cfg, cfg.data.train_split), cfg.seg.convergence.holdout)
    val = split_dataset(cfg, cfg.data.val_split)
    parts = {"train part": train, "held out": held, "val": val}
    print(f"seg.convergence.holdout = {cfg.seg.convergence.holdout}")
    for name, ds in parts.items():
        print(f"{name:>10}: {len(ds) if ds is not None else 0} images")
    if held is None:
        return
    print("held-out ids sha256:", hashlib.sha256("\n".join(held.ids).encode()).hexdigest()[:16],
          f"(first {held.ids[0]}, last {held.ids[-1]})")
    counts = {name: sum(ds.load_labels(sid) for sid in ds.ids) for name, ds in parts.items()}
    print(f"\n{'class':<12}" + "".join(f"{name:>11}" for name in parts))
    for k, cls in enumerate(train.class_names[1:]):
        print(f"{cls:<12}" + "".join(f"{int(c[k]):>11}" for c in counts.values()))
    absent = [cls for k, cls in enumerate(train.class_names[1:]) if counts["held out"][k] == 0]
    print(f"\nclasses with no held-out image: {', '.join(absent) or 'none'}; "
          f"fewest held-out images for a class: {int(np.min(counts['held out']))}")


if __name__ == "__main__":
    main()
