"""Pseudo-mask quality: CAM seed mIoU over a background-threshold sweep, and mask mIoU against GT."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence


from wsss.cam.store import read_cams
from wsss.data.base import SegDataset
from wsss.io.images import read_index_png
from wsss.metrics import ConfusionMatrix, SegMetrics
from wsss.pseudo.threshold import cam_labels

DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 13))  # 0.05 .. 0.60


def cam_threshold_sweep(cams_dir: Path, ds: SegDataset, ids: Iterable[str], thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        absent: str = "union") -> list[tuple[float, SegMetrics]]:
    """Seed quality (the field's "CAM mIoU on train"): one confusion matrix per background threshold."""
    mats = {t: ConfusionMatrix(ds.num_classes) for t in thresholds}
    for sid in ids:
        classes, cams = read_cams(Path(cams_dir) / f"{sid}.npz")
        gt = ds.load_mask(sid, cams.shape[1:])
        for t, m in mats.items():
            m.update(cam_labels(cams, classes, t), gt)
    return [(t, mats[t].compute(ds.class_names, absent)) for t in thresholds]


def best_threshold(sweep: list[tuple[float, SegMetrics]]) -> tuple[float, SegMetrics]:
    return max(sweep, key=lambda tm: tm[1].miou)


def mask_quality(mask_dir: Path, ds: SegDataset, ids: Iterable[str], absent: str = "union") -> tuple[SegMetrics, float]:
    """mIoU of label PNGs against GT (255 in a pseudo mask counts as a miss) and the labelled fraction."""
    cm = ConfusionMatrix(ds.num_classes)
    labelled = total = 0
    for sid in ids:
        gt = ds.load_mask(sid)
        pred = read_index_png(Path(mask_dir) / f"{sid}.png", ds.num_classes, gt.shape, "pseudo mask", against="its ground-truth mask")
        cm.update(pred, gt)
        labelled += int((pred != 255).sum())
        total += pred.size
    return cm.compute(ds.class_names, absent), labelled / max(total, 1)


def sweep_table(sweep: list[tuple[float, SegMetrics]]) -> str:
    rows = [f"| {t:.2f} | {100 * m.miou:.2f} | {100 * m.mean_precision:.2f} | {100 * m.mean_recall:.2f} |" for t, m in sweep]
    return "| bg threshold | mIoU | precision | recall |\n|---|---|---|---|\n" + "\n".join(rows)
