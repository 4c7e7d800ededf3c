"""Scoring folders of label PNGs: usable without anything else from wsss (`wsss evaluate --pred --gt`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from wsss.errors import DataError
from wsss.io import atomic
from wsss.io.images import read_index_png
from wsss.metrics import ConfusionMatrix, SegMetrics

log = logging.getLogger("wsss")


def save_metrics(directory: Path, name: str, result: SegMetrics, title: str) -> str:
    """Write `<name>.json` and `<name>.txt` (the table) atomically; log and return the table."""
    directory.mkdir(parents=True, exist_ok=True)
    table = result.table(title)
    atomic.write_json(directory / f"{name}.json", {"title": title, **result.to_dict()})
    atomic.write_text(directory / f"{name}.txt", table + "\n")
    log.info("%s\nmIoU %.2f", table, 100 * result.miou)
    return table


def evaluate_folders(pred_dir: Path, gt_dir: Path, class_names: Sequence[str], absent: str = "union",
                     ids: Optional[Sequence[str]] = None) -> SegMetrics:
    """Score `pred_dir/<id>.png` against every `gt_dir/<id>.png` (or the given ids)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not gt_dir.is_dir():
        raise DataError(gt_dir, "ground-truth folder not found")
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder not found")
    names = list(ids) if ids is not None else sorted(p.stem for p in gt_dir.glob("*.png"))
    if not names:
        raise DataError(gt_dir, "no .png ground-truth masks found")
    cm = ConfusionMatrix(len(class_names))
    for name in tqdm(names, desc="evaluate", leave=False, disable=None):  # no bar in logs
        gt = read_index_png(gt_dir / f"{name}.png", len(class_names), None, "ground truth")
        pred_path = pred_dir / f"{name}.png"
        if not pred_path.is_file():
            raise DataError(pred_path, f"prediction missing for ground truth {gt_dir / (name + '.png')}")
        cm.update(read_index_png(pred_path, len(class_names), gt.shape, "prediction",
                                 against="its ground-truth mask"), gt)
    return cm.compute(class_names, absent)


