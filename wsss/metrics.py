"""Confusion-matrix segmentation metrics accumulated over a whole split (not averaged per image).

Convention for classes that never occur (stated in every table):
  absent="union" (default; mmseg, rloss, torchmetrics-style nanmean): a class enters the mean when it
      appears in the ground truth or in the predictions. A class predicted but absent from the GT
      has IoU 0 and lowers the mean; a class in neither is excluded.
  absent="gt" (PSA/PMM evaluation.py): only classes present in the ground truth enter the mean.
Pixels whose ground truth is 255 are ignored. Predictions of 255 count as "no class" (a miss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from wsss.io.images import IGNORE



class ConfusionMatrix:
    """Accumulates a C x C confusion matrix (rows = ground truth, cols = prediction) with bincount."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.unlabelled_pred = np.zeros(num_classes, dtype=np.int64)  # GT pixels predicted 255

    def update(self, pred: Any, gt: Any) -> None:
        """Add one prediction/GT pair, each (H, W) or (N, H, W) integer labels."""
        pred = _to_numpy(pred).astype(np.int64, copy=False)
        gt = _to_numpy(gt).astype(np.int64, copy=False)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
        valid = gt != IGNORE
        if np.any(gt[valid] >= self.num_classes) or np.any(gt[valid] < 0):
            raise ValueError(f"ground truth has labels outside 0..{self.num_classes - 1} and 255")
        p, g = pred[valid], gt[valid]
        miss = (p == IGNORE) | (p < 0) | (p >= self.num_classes)
        if miss.any():
            self.unlabelled_pred += np.bincount(g[miss], minlength=self.num_classes)
            p, g = p[~miss], g[~miss]
        self.matrix += np.bincount(g * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix
        self.unlabelled_pred += other.unlabelled_pred

    def compute(self, class_names: Sequence[str] | None = None, absent: str = "union") -> "SegMetrics":
        return SegMetrics.from_confusion(self.matrix, self.unlabelled_pred, class_names, absent)


@dataclass
class SegMetrics:
    """Per-class IoU/precision/recall and the summary numbers, as fractions in [0, 1]."""

    class_names: list[str]
    iou: list[float]  # NaN where the class is excluded by the absent-class convention
    precision: list[float]
    recall: list[float]
    gt_pixels: list[int]
    pred_pixels: list[int]
    miou: float
    pixel_accuracy: float
    mean_precision: float
    mean_recall: float
    absent: str
    confusion: list[list[int]] = field(repr=False, default_factory=list)

    @classmethod
    def from_confusion(cls, matrix: np.ndarray, unlabelled: np.ndarray | None = None,
                       class_names: Sequence[str] | None = None, absent: str = "union") -> "SegMetrics":
        if absent not in ("union", "gt"):
            raise ValueError(f"absent must be 'union' or 'gt', got {absent!r}")
        c = matrix.shape[0]
        names = list(class_names) if class_names else [str(i) for i in range(c)]
        unlabelled = np.zeros(c, dtype=np.int64) if unlabelled is None else unlabelled
        tp = np.diag(matrix).astype(np.float64)
        gt = matrix.sum(1) + unlabelled  # all valid GT pixels of the class
        pred = matrix.sum(0)
        union = gt + pred - tp
        keep = (gt > 0) if absent == "gt" else (union > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(keep, tp / np.maximum(union, 1), np.nan)
            precision = np.where(pred > 0, tp / np.maximum(pred, 1), np.nan)
            recall = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
        total = gt.sum()
        return cls(
            class_names=names,
            iou=iou.tolist(),
            precision=precision.tolist(),
            recall=recall.tolist(),
            gt_pixels=gt.astype(int).tolist(),
            pred_pixels=pred.astype(int).tolist(),
            miou=float(np.nanmean(iou)) if keep.any() else float("nan"),
            pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
            mean_precision=float(np.nanmean(precision[keep])) if keep.any() and np.isfinite(precision[keep]).any() else float("nan"),
            mean_recall=float(np.nanmean(recall[keep])) if keep.any() and np.isfinite(recall[keep]).any() else float("nan"),
            absent=absent,
            confusion=matrix.astype(int).tolist(),
        )

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN -> None); percentages are not applied."""
        def clean(v):
            if isinstance(v, list):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and not np.isfinite(v) else v

        return {k: clean(v) for k, v in self.__dict__.items()}

    def table(self, title: str = "") -> str:
        """A per-class table (percent) with the summary rows, as plain text."""
        from tabulate import tabulate

        rows = []
        for i, name in enumerate(self.class_names):
            rows.append([i, name, _pct(self.iou[i]), _pct(self.precision[i]), _pct(self.recall[i]), self.gt_pixels[i]])
        rows.append(["", "mean", _pct(self.miou), _pct(self.mean_precision), _pct(self.mean_recall), sum(self.gt_pixels)])
        head = f"{title}\n" if title else ""
        note = (f"pixel accuracy {_pct(self.pixel_accuracy)}; mean over classes present in "
                + ("GT or prediction" if self.absent == "union" else "the GT") + "; '-' = excluded")
        return head + tabulate(rows, headers=["#", "class", "IoU", "precision", "recall", "GT pixels"],
                               tablefmt="github", disable_numparse=True) + "\n" + note


def _pct(v: float) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"


def _to_numpy(x: Any) -> np.ndarray:
    """numpy arrays pass through; torch tensors are copied to the CPU (torch is not imported here)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
