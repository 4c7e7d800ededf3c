"""Saliency quality against ground-truth foreground (any non-background class; 255 = ignored).

MAE        mean absolute error of the [0, 1] map, averaged over pixels of an image, then over images.
max F      the saliency field's F-measure with beta^2 = 0.3: per image, precision and recall of
           `map >= k / 255` for k = 0..255 are computed; they are averaged over images (images
           whose ground truth has no foreground pixel are left out of this mean), F is computed per
           threshold from the mean precision and recall, and the best threshold is reported.
           Maps are not min-max normalised per image (they are probabilities).
fg IoU     foreground IoU of `map >= threshold` from intersections and unions summed over all
           images (as mIoU sums one confusion matrix), at a threshold stated with the number.
No deep-learning imports: usable on any folder of 8-bit maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from wsss.errors import DataError

BETA2 = 0.3
LEVELS = 256
IGNORE = 255


@dataclass
class SaliencyResult:
    """Scores of a set of saliency maps."""

    mae: float
    max_f: float
    max_f_threshold: float  # the threshold (k / 255) of max F
    fg_iou: float
    threshold: float  # of fg_iou
    images: int

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"MAE {self.mae:.4f}  max F (beta^2=0.3) {self.max_f:.4f} at {self.max_f_threshold:.3f}  "
                f"fg IoU {100 * self.fg_iou:.2f} at threshold {self.threshold:.2f}  ({self.images} images)")


class SaliencyMeter:
    """Accumulates MAE, precision/recall curves and foreground IoU over images."""

    def __init__(self, threshold: float = 0.5):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.mae_sum = 0.0
        self.images = 0
        self.precision_sum = np.zeros(LEVELS)
        self.recall_sum = np.zeros(LEVELS)
        self.curve_images = 0
        self.inter = 0
        self.union = 0

    def update(self, sal: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: sal (H, W) float in [0, 1], gt (H, W) uint8 labels (0 = background, 255 = ignore)."""
        if sal.shape != gt.shape:
            raise ValueError(f"saliency {sal.shape} and ground truth {gt.shape} differ in size")
        valid = gt != IGNORE
        s = np.asarray(sal, dtype=np.float64)[valid]
        fg = gt[valid] > 0
        self.images += 1
        if s.size:
            self.mae_sum += float(np.abs(s - fg).mean())
        q = np.clip(np.rint(s * 255.0), 0, 255).astype(np.int64)
        fg_hist = np.bincount(q[fg], minlength=LEVELS)
        bg_hist = np.bincount(q[~fg], minlength=LEVELS)
        tp = np.cumsum(fg_hist[::-1])[::-1]  # tp[k] = foreground pixels with level >= k
        fp = np.cumsum(bg_hist[::-1])[::-1]
        positives = int(fg.sum())
        if positives:
            self.precision_sum += tp / np.maximum(tp + fp, 1)
            self.recall_sum += tp / positives
            self.curve_images += 1
        pred = s >= self.threshold
        self.inter += int((pred & fg).sum())
        self.union += int((pred | fg).sum())

    def result(self) -> SaliencyResult:
        if self.curve_images:
            p = self.precision_sum / self.curve_images
            r = self.recall_sum / self.curve_images
            f = (1 + BETA2) * p * r / np.maximum(BETA2 * p + r, 1e-12)
            k = int(np.argmax(f))
            max_f, at = float(f[k]), k / 255.0
        else:
            max_f, at = float("nan"), float("nan")
        return SaliencyResult(mae=self.mae_sum / max(self.images, 1), max_f=max_f, max_f_threshold=at,
                              fg_iou=self.inter / self.union if self.union else float("nan"),
                              threshold=self.threshold, images=self.images)


def score_maps(pairs: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float = 0.5) -> SaliencyResult:
    """Scores of (saliency, ground truth) pairs."""
    meter = SaliencyMeter(threshold)
    for sal, gt in pairs:
        meter.update(sal, gt)
    return meter.result()


def _check_coverage(sal_dir: Path, ids: list[str], what: str) -> None:
    missing = [sid for sid in ids if not (sal_dir / f"{sid}.png").is_file()]
    if missing:
        raise DataError(sal_dir / f"{missing[0]}.png", f"file not found ({len(missing)} of {len(ids)} {what} "
                                                        "have no saliency map in this folder)")


def evaluate_saliency_dataset(sal_dir: str | Path, ds, threshold: float = 0.5, ids: list[str] | None = None) -> SaliencyResult:
    """Score `sal_dir/<id>.png` against the masks of a data set (a SegDataset with masks) for `ids` (default: all)."""
    from wsss.io.images import read_saliency

    sal_dir = Path(sal_dir)
    ids = list(ds.ids if ids is None else ids)
    _check_coverage(sal_dir, ids, "images of the split")
    meter = SaliencyMeter(threshold)
    for sid in ids:
        gt = ds.load_mask(sid)
        meter.update(read_saliency(sal_dir / f"{sid}.png", gt.shape, ds.max_pixels), gt)
    return meter.result()


def evaluate_saliency_folder(sal_dir: str | Path, gt_dir: str | Path, threshold: float = 0.5,
                             ids: list[str] | None = None, max_pixels: int = 50_000_000) -> SaliencyResult:
    """Score `sal_dir/<id>.png` against `gt_dir/<id>.png` (index/palette PNGs) for every GT id (or `ids`).

    A GT id without a saliency map, or a map of another size, is an error naming the file.
    """
    from wsss.io import atomic
    from wsss.io.images import read_index_png, read_saliency

    sal_dir, gt_dir = Path(sal_dir), Path(gt_dir)
    for d, what in ((sal_dir, "saliency folder"), (gt_dir, "ground-truth folder")):
        if not d.is_dir():
            raise DataError(d, f"{what} not found")
    if ids is None:
        ids = [p.stem for p in atomic.finished_files(gt_dir, "*.png")]
    if not ids:
        raise DataError(gt_dir, "no ground-truth PNGs")
    _check_coverage(sal_dir, ids, "ground-truth ids")
    meter = SaliencyMeter(threshold)
    for sid in ids:
        gt = read_index_png(gt_dir / f"{sid}.png", 255, None, "mask", max_pixels)
        meter.update(read_saliency(sal_dir / f"{sid}.png", gt.shape, max_pixels), gt)
    return meter.result()
