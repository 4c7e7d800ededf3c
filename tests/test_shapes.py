"""The synthetic `shapes` set: deterministic, VOC-like, every sample fully annotated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from wsss.config import DataConfig
from wsss.data import build_dataset
from wsss.data.shapes import CLASS_NAMES, generate_sample


def _cfg(root: Path, **shapes) -> DataConfig:
    cfg = OmegaConf.structured(DataConfig)
    cfg.root = str(root)
    cfg.shapes = OmegaConf.merge(cfg.shapes, {"num_train": 12, "num_val": 4, "image_size": 64, **shapes})
    return cfg


def test_generate_is_deterministic_and_well_formed():
    a, b, c = generate_sample(7, 96), generate_sample(7, 96), generate_sample(8, 96)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (96, 96, 3) and a["image"].dtype == np.uint8
    assert a["mask"].shape == (96, 96) and set(np.unique(a["mask"])) <= set(range(len(CLASS_NAMES)))
    assert a["saliency"].dtype == np.float32 and 0 <= a["saliency"].min() and a["saliency"].max() <= 1


def test_statistics_look_like_voc():
    masks = [generate_sample(i, 96)["mask"] for i in range(60)]
    n_classes = [len(set(np.unique(m)) - {0}) for m in masks]
    fg = np.mean([np.mean(m > 0) for m in masks])
    assert max(n_classes) >= 2 and np.mean(n_classes) >= 1.0  # mostly 1-3 classes per image
    assert 0.05 < fg < 0.5  # objects cover a minority of the image, as on VOC (~30%)
    present = set().union(*[set(np.unique(m)) for m in masks]) - {0}
    assert present == set(range(1, len(CLASS_NAMES)))


def test_saliency_is_noisy_but_informative():
    s = [generate_sample(i, 96) for i in range(20)]
    fg = np.concatenate([x["saliency"][x["mask"] > 0] for x in s])
    bg = np.concatenate([x["saliency"][x["mask"] == 0] for x in s])
    assert fg.mean() > bg.mean() + 0.3  # informative
    assert (fg < 0.5).mean() > 0.05 and (bg > 0.5).mean() > 0.005  # but with misses and false alarms


def test_dataset_cache_and_sample_shape(tmp_path: Path):
    train = build_dataset(_cfg(tmp_path), "train")
    again = build_dataset(_cfg(tmp_path), "train")
    assert train.dir == again.dir and len(train) == 12
    s = train[0]
    assert set(s) == {"id", "image", "labels", "mask", "scribble", "saliency"}
    assert s["labels"].shape == (len(CLASS_NAMES) - 1,)
    present = {c for c in np.unique(s["mask"]) if c not in (0, 255)}
    assert {int(i) + 1 for i in np.nonzero(s["labels"])[0]} == present
    scribbled = s["scribble"][s["scribble"] != 255]
    assert np.all(s["mask"][s["scribble"] != 255] == scribbled)  # scribbles never carry a wrong label
    assert len(build_dataset(_cfg(tmp_path), "val")) == 4
    other = build_dataset(_cfg(tmp_path, seed=1), "train")
    assert other.dir != train.dir


def test_unknown_split_is_an_error(tmp_path: Path):
    from wsss.errors import DataError

    with pytest.raises(DataError, match="shapes has splits"):
        build_dataset(_cfg(tmp_path), "test")
