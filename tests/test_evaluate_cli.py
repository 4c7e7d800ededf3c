"""`wsss evaluate --pred DIR --gt DIR` on any folder of index PNGs, checked on real VOC masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.classes import VOC_CLASSES
from wsss.io.images import write_index_png




def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsss", *args], capture_output=True, text=True, timeout=300)


def _shift(mask: np.ndarray, dx: int) -> np.ndarray:
    """Shift right by dx pixels, filling the vacated columns with background."""
    out = np.zeros_like(mask)
    out[:, dx:] = mask[:, :-dx]
    return out


def _expected_miou(gts: list[np.ndarray], preds: list[np.ndarray], num_classes: int) -> float:
    """Independent count: per class TP/FP/FN over all valid pixels, mean over classes in GT or prediction."""
    ious = []
    for c in range(num_classes):
        tp = fp = fn = 0
        for g, p in zip(gts, preds):
            valid = g != 255
            tp += int(np.sum((p == c) & (g == c) & valid))
            fp += int(np.sum((p == c) & (g != c) & valid))
            fn += int(np.sum((p != c) & (g == c) & valid))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return 100 * float(np.mean(ious))


def test_gt_against_itself_and_shifted_copy(voc_mini: Path, tmp_path: Path):
    gt_dir = voc_mini / "VOC2012" / "SegmentationClass"
    ids = (voc_mini / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:40]
    gt_sub = tmp_path / "gt"
    shifted = tmp_path / "shifted"
    gts, preds = [], []
    for sid in ids:  # a 40-image subset keeps the test fast; the CLI reads any folder
        g = np.asarray(Image.open(gt_dir / f"{sid}.png"))
        write_index_png(gt_sub / f"{sid}.png", g)
        p = _shift(np.where(g == 255, 0, g).astype(np.uint8), 7)
        write_index_png(shifted / f"{sid}.png", p)
        gts.append(g)
        preds.append(p)

    same = _run("evaluate", "--pred", str(gt_sub), "--gt", str(gt_sub), "--dataset", "voc12")
    assert same.returncode == 0, same.stderr
    assert "mIoU 100.00" in same.stdout

    out_json = tmp_path / "m.json"
    res = _run("evaluate", "--pred", str(shifted), "--gt", str(gt_sub), "--dataset", "voc12", "--json", str(out_json))
    assert res.returncode == 0, res.stderr
    expected = _expected_miou(gts, preds, len(VOC_CLASSES))
    assert f"mIoU {expected:.2f}" in res.stdout
    assert 100 * json.loads(out_json.read_text())["miou"] == pytest.approx(expected, abs=1e-9)
    assert expected < 100


def test_missing_prediction_is_named(tmp_path: Path):
    gt = tmp_path / "gt"
    write_index_png(gt / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "pred").mkdir()
    res = _run("evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(gt))
    assert res.returncode == 2
    assert "a.png: prediction missing" in res.stderr and "Traceback" not in res.stderr


def test_prediction_size_mismatch_is_named(tmp_path: Path):
    write_index_png(tmp_path / "gt" / "a.png", np.zeros((4, 4), np.uint8))
    write_index_png(tmp_path / "pred" / "a.png", np.zeros((4, 5), np.uint8))
    res = _run("evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"))
    assert res.returncode == 2 and "pred/a.png" in res.stderr and "differs" in res.stderr
