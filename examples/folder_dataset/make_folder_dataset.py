"""Build a small "folder of my own images" data set (cats and dogs) from the voc12-mini slice.

    python examples/folder_dataset/make_folder_dataset.py --out data/pets
    wsss data check configs/folder_example.yaml               # check it
    wsss run configs/folder_example.yaml                      # train on it (data.root=data/pets)

It writes the layout documented in docs/datasets.md:
    data/pets/images/<id>.jpg      the VOC images whose only objects are cats and/or dogs
    data/pets/labels.csv           id,labels   e.g.  2007_000528,cat  /  2008_001640,cat;dog
    data/pets/classes.txt          background, cat, dog
    data/pets/masks/<id>.png       pixel masks for the val images only (what you would draw by hand
                                   to measure quality); train images have image-level labels only
    data/pets/splits/train.txt, splits/val.txt
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from wsss.data.labels import write_label_csv
from wsss.data.voc import VOCDataset
from wsss.io.images import write_index_png

KEEP = {"cat": 8, "dog": 12}  # VOC class index of each class we keep
DEFAULT_VOC = Path(__file__).resolve().parents[3] / "shared" / "data" / "voc12-mini"


def build(voc_root: Path, out: Path, max_per_split: int = 0) -> dict[str, list[str]]:
    """Write the folder data set to `out`; return the ids of each split."""
    classes = ["background", *KEEP]
    remap = np.full(256, 0, dtype=np.uint8)  # VOC index -> our index; other classes never occur here
    for ours, voc_index in enumerate(KEEP.values(), start=1):
        remap[voc_index] = ours
    remap[255] = 255
    labels: dict[str, np.ndarray] = {}
    splits: dict[str, list[str]] = {}
    for split in ("train", "val"):
        voc = VOCDataset(voc_root, split)
        chosen = []
        for sid in voc.ids:
            present = set(np.flatnonzero(voc.load_labels(sid)) + 1)
            if not present or not present <= set(KEEP.values()):
                continue  # an image with a person or a sofa in it would need those classes too
            mask = remap[voc.load_mask(sid)]
            shutil.copyfile(voc.image_path(sid), _mkparent(out / "images" / f"{sid}.jpg"))
            labels[sid] = np.array([float(v in present) for v in KEEP.values()], dtype=np.float32)
            if split == "val":
                write_index_png(out / "masks" / f"{sid}.png", mask)
            chosen.append(sid)
            if max_per_split and len(chosen) >= max_per_split:
                break
        splits[split] = chosen
        _mkparent(out / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in chosen))
    write_label_csv(out / "labels.csv", labels, classes)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return splits


def _mkparent(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voc", type=Path, default=DEFAULT_VOC, help="voc12-mini (or any VOCdevkit/VOC2012)")
    ap.add_argument("--out", type=Path, default=Path("data/pets"))
    ap.add_argument("--max-per-split", type=int, default=0, help="0 = every matching image")
    args = ap.parse_args(argv)
    splits = build(args.voc, args.out, args.max_per_split)
    print(f"wrote {args.out}: {len(splits['train'])} train, {len(splits['val'])} val images (val with masks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
