"""Confusion-matrix metrics against hand-computed cases and an independent per-pixel count."""

from __future__ import annotations

import numpy as np
import pytest

from wsss.metrics import ConfusionMatrix
from wsss.pseudo.threshold import cam_labels


def test_hand_computed_iou_precision_recall():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [255, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2], [2, 2, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    m = cm.compute()
    # 11 valid pixels (one GT 255). class 0: gt 4, pred 4, tp 3 -> iou 3/5
    # class 1: gt 4, pred 4, tp 3 -> 3/5 ; class 2: gt 3, pred 3 (the pred under GT 255 is ignored), tp 2 -> 2/4
    assert m.iou == pytest.approx([3 / 5, 3 / 5, 2 / 4])
    assert m.precision == pytest.approx([3 / 4, 3 / 4, 2 / 3])
    assert m.recall == pytest.approx([3 / 4, 3 / 4, 2 / 3])
    assert m.miou == pytest.approx(np.mean([3 / 5, 3 / 5, 2 / 4]))
    assert m.pixel_accuracy == pytest.approx(8 / 11)


def test_accumulates_over_images_not_per_image_mean():
    cm = ConfusionMatrix(2)
    cm.update(np.array([[1, 1]]), np.array([[1, 1]]))  # perfect small image
    cm.update(np.zeros((10, 10), int), np.ones((10, 10), int))  # large miss
    m = cm.compute()
    assert m.iou[1] == pytest.approx(2 / 102)  # not the mean of the per-image IoUs (0.5)


def test_absent_class_conventions():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 predicted but absent from the GT; class 3 in neither
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    union = cm.compute(absent="union")
    assert union.iou[2] == 0.0 and np.isnan(union.iou[3])
    assert union.miou == pytest.approx((1 / 2 + 1 + 0) / 3)
    gt_only = cm.compute(absent="gt")
    assert np.isnan(gt_only.iou[2]) and gt_only.miou == pytest.approx((1 / 2 + 1) / 2)


def test_prediction_255_counts_as_miss():
    cm = ConfusionMatrix(2)
    cm.update(np.array([[255, 1]]), np.array([[1, 1]]))
    m = cm.compute()
    assert m.recall[1] == pytest.approx(0.5) and m.precision[1] == pytest.approx(1.0) and m.iou[1] == pytest.approx(0.5)


def test_random_against_bruteforce():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (3, 17, 13))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 5, gt.shape)
    cm = ConfusionMatrix(5)
    for p, g in zip(pred, gt):
        cm.update(p, g)
    valid = gt != 255
    for c in range(5):
        tp = np.sum((pred == c) & (gt == c) & valid)
        fp = np.sum((pred == c) & (gt != c) & valid)
        fn = np.sum((pred != c) & (gt == c) & valid)
        assert cm.compute().iou[c] == pytest.approx(tp / (tp + fp + fn))


def test_errors_and_serialisation():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros((1, 1)), np.array([[7]]))
    cm.update(np.zeros((2, 2), int), np.zeros((2, 2), int))
    d = cm.compute(["bg", "a", "b"]).to_dict()
    assert d["iou"][1] is None and d["miou"] == 1.0
    assert "mean" in cm.compute(["bg", "a", "b"]).table()


def test_cam_labels_background_threshold():
    cams = np.array([[[0.1, 0.6], [0.3, 0.2]], [[0.05, 0.1], [0.9, 0.1]]], np.float32)
    labels = cam_labels(cams, np.array([3, 7]), 0.25)
    assert labels.tolist() == [[0, 3], [7, 0]]
    assert cam_labels(np.zeros((0, 2, 2)), np.array([], int), 0.2).tolist() == [[0, 0], [0, 0]]
