"""Folder-of-your-images adapter: layout, label files (CSV/JSON/npy, names/indices), splits, masks."""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from wsss.config import load_recipe
from wsss.data import build_dataset
from wsss.data.folder import FolderDataset
from wsss.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _names(ds, sid):
    return [ds.class_names[k + 1] for k in np.flatnonzero(ds.load_labels(sid))]


def test_basic_layout(make_folder):
    ds = FolderDataset(make_folder())
    assert ds.ids == ["cat_1", "dog_1", "both"]  # labels-file order
    assert ds.class_names == ["background", "cat", "dog"]
    assert _names(ds, "both") == ["cat", "dog"]
    s = ds[0]
    assert s["image"].shape == (8, 10, 3) and s["labels"].tolist() == [1.0, 0.0]
    assert "mask" not in s and not ds.has_masks and not ds.has_scribbles and not ds.has_saliency


def test_subfolders_extensions_and_odd_names(make_folder, write_image):
    root = make_folder()
    write_image(root / "images" / "farm" / "IMG (2).JPG")
    write_image(root / "images" / "chat_noir_été.webp")
    with open(root / "labels.csv", "a") as f:
        f.write('farm/IMG (2).JPG,Dog\n"chat_noir_été",cat\n')  # id with extension, any name case
    ds = FolderDataset(root)
    assert ds.ids[-2:] == ["farm/IMG (2)", "chat_noir_été"]
    assert _names(ds, "farm/IMG (2)") == ["dog"] and ds.load_image("chat_noir_été").shape == (8, 10, 3)
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("farm/IMG (2).JPG\nchat_noir_été\n", encoding="utf-8")
    assert FolderDataset(root, "val").ids == ["farm/IMG (2)", "chat_noir_été"]


def test_class_indices_and_json_forms(make_folder):
    root = make_folder(rows={"a": "1", "b": "2;1", "c": ""})
    ds = FolderDataset(root)
    assert _names(ds, "b") == ["cat", "dog"] and not ds.load_labels("c").any()
    (root / "labels.csv").unlink()
    (root / "labels.json").write_text(json.dumps({"a": ["cat"], "b": [2, "cat"], "c": "dog"}))
    ds = FolderDataset(root)
    assert _names(ds, "b") == ["cat", "dog"] and _names(ds, "c") == ["dog"]
    (root / "labels.json").write_text(json.dumps([{"id": "a", "labels": []}, {"id": "b", "labels": ["dog"]},
                                                  {"id": "c.png", "labels": [1]}]))
    ds = FolderDataset(root)
    assert ds.ids == ["a", "b", "c"] and _names(ds, "c") == ["cat"]


def test_classes_derived_from_names(make_folder, caplog):
    root = make_folder(rows={"a": "zebra", "b": "Aardvark;zebra"}, classes=None)
    with caplog.at_level(logging.INFO):
        ds = FolderDataset(root)
    assert ds.class_names == ["background", "Aardvark", "zebra"]
    assert "no classes.txt" in caplog.text
    root2 = make_folder(rows={"a": "1"}, classes=None)
    with pytest.raises(DataError, match=r"labels\.csv: labels use class indices .* no classes\.txt"):
        FolderDataset(root2)


def test_npy_labels_with_string_ids(make_folder, tmp_path):
    root = make_folder()
    np.save(tmp_path / "cls.npy", {"cat_1": np.array([1, 0], np.uint8), "dog_1": np.array([0, 1], np.uint8),
                                   "both": np.array([1, 1], np.uint8)})
    ds = FolderDataset(root, labels_file=tmp_path / "cls.npy")
    assert _names(ds, "both") == ["cat", "dog"]


def test_splits_and_partial_masks(make_folder):
    root = make_folder(masks={"cat_1": (1,), "both": (1, 2)},
                       splits={"train": ["cat_1", "dog_1", "both"], "val": ["cat_1", "both.png"]})
    train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
    assert val.ids == ["cat_1", "both"] and val.has_masks
    assert not train.has_masks  # dog_1 has no mask: a partially masked split trains without masks
    assert "mask" in train.load("cat_1") and "mask" not in train.load("dog_1")
    np.testing.assert_array_equal(val.load_labels("both"), [1, 1])
    assert val.check(("image", "labels", "mask")).ids == ["cat_1", "both"]


def test_no_splits_dir_means_every_image(make_folder):
    root = make_folder()
    assert FolderDataset(root, "train").ids == FolderDataset(root, "val").ids == ["cat_1", "dog_1", "both"]


def test_optional_dirs_and_overrides(make_folder, write_mask):
    from PIL import Image

    root = make_folder()
    for sid in ("cat_1", "dog_1", "both"):
        write_mask(root / "scribbles" / f"{sid}.png", (1,))
        write_mask(root / "hand_masks" / f"{sid}.png", (2,))
        (root / "saliency").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 10), 255, np.uint8)).save(root / "saliency" / f"{sid}.jpg")
    ds = FolderDataset(root, mask_dir="hand_masks")
    assert ds.has_scribbles and ds.has_saliency and ds.has_masks
    s = ds[2]
    assert 2 in s["mask"] and 1 in s["scribble"] and s["saliency"].max() > 0.9


def test_from_config_with_the_example_recipe(make_folder):
    root = make_folder(splits={"train": ["cat_1", "dog_1"], "val": ["both"]})
    cfg = load_recipe(ROOT / "configs" / "folder_example.yaml", [f"data.root={root}"])
    assert cfg.data.dataset == "folder"
    ds = build_dataset(cfg.data, cfg.data.val_split)
    assert isinstance(ds, FolderDataset) and ds.ids == ["both"]


def test_check_command(make_folder, tmp_path, capsys):
    """A folder is checked with `wsss data check` and the example recipe (no second CLI in wsss.data.folder)."""
    from wsss.cli import main

    main(["data", "check", str(ROOT / "configs" / "folder_example.yaml"), f"data.root={make_folder()}",
          f"run.root={tmp_path / 'runs'}"])
    assert "train: 3 of 3 samples OK (image, labels)" in capsys.readouterr().out


def test_classes_file_problems(make_folder):
    root = make_folder(classes=("cat", "dog"))
    with pytest.raises(DataError, match=r"classes\.txt: first class must be the background .* got 'cat'"):
        FolderDataset(root)
    (root / "classes.txt").write_text("_background_\ncat\ndog\nCat\n")
    with pytest.raises(DataError, match=r"classes\.txt: class 'Cat' is listed twice"):
        FolderDataset(root)


def test_masks_need_a_class_list(make_folder):
    root = make_folder(classes=None, masks={"cat_1": (1,)})
    with pytest.raises(DataError, match=r"classes\.txt: class list not found; it is required when masks"):
        FolderDataset(root)


def test_missing_images_dir_and_labels_file(tmp_path, make_folder):
    with pytest.raises(DataError, match=r"images: image directory not found"):
        FolderDataset(tmp_path)
    root = make_folder()
    (root / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"labels\.csv: labels file not found"):
        FolderDataset(root)


def test_csv_format_problems(make_folder):
    root = make_folder()
    (root / "labels.csv").write_text("id,labels\ncat_1,cat,dog\n")
    with pytest.raises(DataError, match=r"labels\.csv: line 2: 3 columns; expected 2 \(id, labels\)"):
        FolderDataset(root)
    (root / "labels.csv").unlink()
    (root / "labels.json").write_text("[1, 2")
    with pytest.raises(DataError, match=r"labels\.json: not valid JSON"):
        FolderDataset(root)


@pytest.mark.voc
def test_worked_example_builds_and_loads(voc_mini, tmp_path, monkeypatch):
    out = tmp_path / "pets"
    script = ROOT / "examples" / "folder_dataset" / "make_folder_dataset.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--voc", str(voc_mini), "--out", str(out), "--max-per-split", "4"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0
    train, val = FolderDataset(out, "train"), FolderDataset(out, "val")
    assert len(train) == len(val) == 4 and train.class_names == ["background", "cat", "dog"]
    assert val.has_masks and not train.has_masks
    val.check(("image", "labels", "mask"))
    for sid in val.ids:  # the remapped masks agree with the labels file
        np.testing.assert_array_equal(val.load_labels(sid), np.asarray([c in val.load_mask(sid) for c in (1, 2)], float))
