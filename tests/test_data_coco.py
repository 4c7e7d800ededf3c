"""COCO 2014 adapter on a tiny COCO-format JSON written by the tests (polygons, RLE, crowd, overlap)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from wsss.config import load_recipe
from wsss.data import build_dataset
from wsss.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from wsss.data.coco import CAT_TO_CLASS, COCODataset
from wsss.errors import DataError

H, W = 16, 20
PERSON, DOG, CAT = 1, 18, 17  # official category ids
BOX = [1, 1, 18, 1, 18, 14, 1, 14]  # polygon covering most of the image
SMALL = [8, 6, 12, 6, 12, 10, 8, 10]  # polygon inside BOX


def _uncompressed_rle(m: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros: the iscrowd=1 format of the official files."""
    flat = m.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    counts = np.diff(np.r_[0, change]).tolist()
    return {"size": [H, W], "counts": counts}


def _top_rows(n: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[:n] = 1
    return m


def _name(i: int, split: str = "train2014") -> str:
    return f"COCO_{split}_{i:012d}"


def make_coco(root: Path, split: str = "train2014", anns: list[dict] | None = None,
              images: list[dict] | None = None, categories: list[dict] | None = None) -> Path:
    """root/<split>/*.jpg and root/annotations/instances_<split>.json; 4 images, one without annotations."""
    from PIL import Image

    images = images if images is not None else [
        {"id": i, "file_name": _name(i, split) + ".jpg", "height": H, "width": W} for i in (1, 2, 3, 4)]
    (root / split).mkdir(parents=True, exist_ok=True)
    for n, im in enumerate(images):
        p = root / split / im["file_name"]
        if ".." not in im["file_name"]:
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(n).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(p)
    cat_rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 4), np.uint8), ((10, 2), (14, 2)))))
    cat_rle["counts"] = cat_rle["counts"].decode()  # as in the official JSON
    if anns is None:
        anns = [
            # image 1: a small dog listed first, on top of a large person: largest-first keeps the dog visible
            {"id": 10, "image_id": 1, "category_id": DOG, "segmentation": [SMALL], "iscrowd": 0, "area": 16},
            {"id": 11, "image_id": 1, "category_id": PERSON, "segmentation": [BOX], "iscrowd": 0, "area": 221},
            # image 2: a cat as compressed RLE and a crowd of people (uncompressed RLE) over the top rows
            {"id": 20, "image_id": 2, "category_id": CAT, "segmentation": cat_rle, "iscrowd": 0, "area": 16},
            {"id": 21, "image_id": 2, "category_id": PERSON, "segmentation": _uncompressed_rle(_top_rows(12)),
             "iscrowd": 1, "area": 240},
            # image 3: no annotations at all; image 4: only a crowd region
            {"id": 40, "image_id": 4, "category_id": PERSON, "segmentation": _uncompressed_rle(_top_rows(3)),
             "iscrowd": 1, "area": 60},
        ]
    categories = categories if categories is not None else [
        {"id": cid, "name": name, "supercategory": "x"} for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann_file


@pytest.fixture
def coco(tmp_path) -> Path:
    make_coco(tmp_path / "coco")
    return tmp_path / "coco"


def test_classes_labels_and_masks(coco, tmp_path):
    ds = COCODataset(coco, "train", cache_dir=tmp_path / "cache")
    assert ds.num_classes == 81 and ds.class_names[0] == "background" and ds.class_names[80] == "toothbrush"
    assert CAT_TO_CLASS[DOG] == ds.class_names.index("dog") == 17
    assert ds.ids == [_name(1), _name(2), _name(4)] and ds.excluded_empty == 1  # image 3 has no annotations
    s1, s2, s4 = (ds.load(i) for i in ds.ids)
    named = lambda s: [ds.class_names[k + 1] for k in np.flatnonzero(s["labels"])]  # noqa: E731
    assert named(s1) == ["person", "dog"] and named(s2) == ["person", "cat"] and named(s4) == ["person"]
    # overlap: the small dog stays visible on top of the larger person although it is listed first
    assert s1["mask"][8, 10] == 17 and s1["mask"][2, 2] == 1 and s1["mask"][0, 0] == 0
    # crowd: ignore (255) where no instance is; the cat instance wins over the crowd region
    assert s2["mask"][0, 0] == 255 and s2["mask"][11, 15] == 16 and s2["mask"][14, 0] == 0
    assert set(np.unique(s4["mask"])) == {0, 255}
    assert s1["image"].shape == (H, W, 3) and s1["mask"].shape == (H, W)
    assert ds.check() is ds and not ds.skipped


def test_masks_are_cached_once_and_reused(coco, tmp_path, monkeypatch):
    ds = COCODataset(coco, "train", cache_dir=tmp_path / "cache")
    files = sorted(ds.mask_dir.glob("*.png"))
    assert len(files) == 3 and files[0].parent.parent == tmp_path / "cache" / "train2014"
    stamps = [f.stat().st_mtime_ns for f in files]
    # a second run must neither parse the annotation JSON nor repaint a mask
    monkeypatch.setattr(COCODataset, "_read_json", lambda self: pytest.fail("annotation JSON read again"))
    ds2 = COCODataset(coco, "train", cache_dir=tmp_path / "cache")
    assert ds2.ids == ds.ids and [f.stat().st_mtime_ns for f in files] == stamps
    np.testing.assert_array_equal(ds2.load_mask(ds.ids[0]), ds.load_mask(ds.ids[0]))
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # atomic writes leave no temporaries


def test_changed_annotations_are_not_served_from_a_stale_cache(coco, tmp_path):
    ds = COCODataset(coco, "train", cache_dir=tmp_path / "cache")
    ann_file = coco / "annotations" / "instances_train2014.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["category_id"] = CAT  # the small animal is a cat after all
    ann_file.write_text(json.dumps(data))
    os.utime(ann_file, ns=(1, 1))
    ds2 = COCODataset(coco, "train", cache_dir=tmp_path / "cache")
    assert ds2.mask_dir != ds.mask_dir
    assert ds2.load_mask(_name(1))[8, 10] == 16 and ds.load_mask(_name(1))[8, 10] == 17


def test_default_cache_lazy_painting_and_split_names(coco):
    ds = COCODataset(coco, "train2014", prepare=0)
    assert ds.mask_dir.parent == coco / "wsss_cache" / "train2014"
    assert not list(ds.mask_dir.glob("*.png")) if ds.mask_dir.exists() else True
    assert ds[1]["mask"][0, 0] == 255  # painted on demand
    assert len(list(ds.mask_dir.glob("*.png"))) == 1
    make_coco(coco, "val2014")
    assert len(COCODataset(coco, "val")) == 3
    with pytest.raises(DataError, match=r"COCO split 'test' is not one of"):
        COCODataset(coco, "test")


def test_from_config_paints_only_what_the_run_uses(coco, tmp_path):
    cfg = load_recipe(None, ["data.dataset=coco14", f"data.root={coco}", f"data.cache_dir={tmp_path / 'c'}",
                             "data.max_images=1"])
    ds = build_dataset(cfg.data, cfg.data.train_split)
    assert isinstance(ds, COCODataset) and len(ds) == 1
    assert len(list(ds.mask_dir.glob("*.png"))) == 1


def test_unwritable_cache_is_a_clear_error(coco, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(DataError, match=r"cannot write the COCO mask cache .*set data.cache_dir"):
        COCODataset(coco, "train", cache_dir=tmp_path / "a_file")


@pytest.mark.parametrize("case, match", [
    ("categories", r"categories are not the 80 official COCO ones"),
    ("category_id", r"annotation 10 has unknown category_id 999"),
    ("image_id", r"annotation 10 refers to an unknown image_id"),
    ("polygon", r"annotation 10: bad segmentation \(polygons need an even number"),
    ("rle_size", r"annotation 10: bad segmentation \(RLE size \[4, 4\] differs from the image size \[16, 20\]"),
    ("traversal", r"sample id '\.\./\.\./evil' is not a plain relative name"),
    ("duplicate", r"duplicate id 'COCO_train2014_000000000001'"),
])
def test_bad_annotation_files(tmp_path, case, match):
    root = tmp_path / "coco"
    ann = {"id": 10, "image_id": 1, "category_id": DOG, "segmentation": [SMALL], "iscrowd": 0}
    images = [{"id": 1, "file_name": _name(1) + ".jpg", "height": H, "width": W}]
    cats = None
    if case == "categories":
        cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "widget"}]
    elif case == "category_id":
        ann["category_id"] = 999
    elif case == "image_id":
        ann["image_id"] = 77
    elif case == "polygon":
        ann["segmentation"] = [[1, 2, 3, 4, 5]]
    elif case == "rle_size":
        ann["segmentation"] = {"size": [4, 4], "counts": [0, 16]}
    elif case == "traversal":
        images = [{"id": 1, "file_name": "../../evil.jpg", "height": H, "width": W}]
    elif case == "duplicate":
        images = images + [{"id": 2, "file_name": _name(1) + ".png", "height": H, "width": W}]
    ann_file = make_coco(root, anns=[ann], images=images, categories=cats)
    with pytest.raises(DataError, match=match) as e:
        COCODataset(root, "train", cache_dir=tmp_path / "cache")
    assert str(ann_file) in str(e.value)


def test_not_json_and_missing_files(tmp_path):
    root = tmp_path / "coco"
    with pytest.raises(DataError, match=r"train2014: COCO image directory not found"):
        COCODataset(root, "train")
    (root / "train2014").mkdir(parents=True)
    with pytest.raises(DataError, match=r"instances_train2014\.json: COCO annotation file not found"):
        COCODataset(root, "train")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2014.json").write_text("{ not json")
    with pytest.raises(DataError, match=r"instances_train2014\.json: not a readable JSON file"):
        COCODataset(root, "train")
    (root / "annotations" / "instances_train2014.json").write_text('{"images": []}')
    with pytest.raises(DataError, match=r"not a COCO instances file"):
        COCODataset(root, "train")


def test_annotation_size_differs_from_image(tmp_path):
    root = tmp_path / "coco"
    make_coco(root)
    ann_file = root / "annotations" / "instances_train2014.json"
    data = json.loads(ann_file.read_text())
    data["images"][0].update(height=H * 2, width=W * 2)
    data["annotations"] = data["annotations"][:2]
    ann_file.write_text(json.dumps(data))
    ds = COCODataset(root, "train", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"mask size 40x32 \(WxH\) differs from its image 20x16") as e:
        ds.load(ds.ids[0])
    assert ds.ids[0] in str(e.value)


def test_bad_segmentation_skipped_with_skip_bad(tmp_path, caplog):
    root = tmp_path / "coco"
    ann_file = make_coco(root)
    data = json.loads(ann_file.read_text())
    data["annotations"][2]["segmentation"] = [[1, 2, 3]]  # image 2's cat: not a polygon
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_train2014\.json: annotation 20: bad segmentation"):
        COCODataset(root, "train", cache_dir=tmp_path / "cache")
    ds = COCODataset(root, "train", cache_dir=tmp_path / "cache", skip_bad=True)
    assert ds.ids == [_name(1), _name(4)] and list(ds.skipped) == [_name(2)]
    assert "skipped 1 image(s) whose annotations cannot be painted" in caplog.text
