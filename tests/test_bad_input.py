"""Every kind of bad input gets a DataError naming the file and the problem, or with skip_bad a warning
and a count; never a traceback from inside PIL, numpy or pycocotools."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from wsss.data.coco import COCODataset
from wsss.data.folder import FolderDataset
from wsss.data.voc import VOCDataset
from wsss.errors import DataError
from wsss.io.images import write_index_png


def raises_data_error(fn, *names: str | Path, problem: str) -> DataError:
    """Call fn; assert a DataError whose message names each of `names` and matches `problem`."""
    with pytest.raises(DataError) as info:
        fn()
    e = info.value
    msg = str(e)
    for n in names:
        assert str(n) in msg, f"{n} not named in: {msg}"
    assert problem.lower() in msg.lower(), f"{problem!r} not in: {msg}"
    # the library error (if any) is folded into the message, not chained as a second traceback
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    return e


# ---- a tiny data set of each kind with one image we can spoil ---------------------------------------


def _tiny_coco(root: Path) -> COCODataset:
    (root / "train2014").mkdir(parents=True)
    images, anns = [], []
    for i in (1, 2):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray(np.full((8, 10, 3), 60 * i, np.uint8)).save(root / "train2014" / name)
        images.append({"id": i, "file_name": name, "height": 8, "width": 10})
        anns.append({"id": 10 + i, "image_id": i, "category_id": 18, "iscrowd": 0,
                     "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]})
    cats = [{"id": c, "name": n} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return COCODataset(root, "train", cache_dir=root.parent / "coco_cache")


@pytest.fixture(params=["voc", "folder", "coco"])
def adapter(request, make_voc, make_folder, tmp_path):
    """(factory(**options) -> data set, id of the image to spoil, path of that image)."""
    kind = request.param
    if kind == "voc":
        root = make_voc()
        return (lambda **kw: VOCDataset(root, "train", **kw)), "2007_000001", root / "JPEGImages" / "2007_000001.jpg"
    if kind == "folder":
        root = make_folder()
        return (lambda **kw: FolderDataset(root, "train", **kw)), "dog_1", root / "images" / "dog_1.png"
    _tiny_coco(tmp_path / "coco")
    sid = "COCO_train2014_000000000001"
    return ((lambda **kw: COCODataset(tmp_path / "coco", "train", cache_dir=tmp_path / "coco_cache", **kw)),
            sid, tmp_path / "coco" / "train2014" / f"{sid}.jpg")


def _png(path: Path, w: int, h: int, depth: int, color_type: int, rows: bytes) -> None:
    """Hand-written PNG (PIL cannot write 16-bit RGB, and a bomb header must not be encoded for real)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _spoil(path: Path, how: str) -> None:
    if how == "corrupt":
        path.write_bytes(b"this is not an image, just bytes with the right extension" * 10)
    elif how == "truncated":
        buf = path.with_suffix(".tmp.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(buf)
        data = buf.read_bytes()
        buf.unlink()
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "bomb":  # the header claims 100000 x 100000 pixels; the file is a few hundred bytes
        _png(path, 100_000, 100_000, 8, 2, b"\x00" * 64)
    elif how == "16-bit gray":
        Image.fromarray(np.full((8, 10), 40000, np.uint16)).save(path, format="PNG")
    elif how == "16-bit RGB":  # PIL would silently decode this to 8 bits
        _png(path, 10, 8, 16, 2, (b"\x00" + b"\x12\x34" * 3 * 10) * 8)
    elif how == "grayscale":
        Image.fromarray(np.full((8, 10), 100, np.uint8)).save(path, format="PNG")
    elif how == "RGBA":
        Image.fromarray(np.full((8, 10, 4), 100, np.uint8)).save(path, format="PNG")
    elif how == "CMYK":
        Image.new("CMYK", (10, 8), (0, 255, 0, 0)).save(path, format="JPEG")
    else:
        raise AssertionError(how)


# ---- images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how, problem", [
    ("corrupt", "not a readable image"),
    ("truncated", "corrupt or truncated image"),
    ("zero-byte", "empty file (0 bytes)"),
    ("bomb", "possible decompression bomb"),
])
def test_unreadable_images(adapter, how, problem):
    make, sid, path = adapter
    ds = make()
    _spoil(path, how)
    raises_data_error(lambda: ds.load(sid), path, problem=problem)


@pytest.mark.parametrize("how", ["corrupt", "truncated", "zero-byte", "bomb", "16-bit gray"])
def test_skip_bad_drops_unreadable_images_with_warning_and_count(adapter, how, caplog):
    make, sid, path = adapter
    _spoil(path, how)
    ds = make(skip_bad=True)
    n = len(ds)
    ds.check()
    assert sid not in ds.ids and len(ds) == n - 1
    assert list(ds.skipped) == [sid] and str(path) in ds.skipped[sid]
    assert f"skipped 1 bad sample(s) of {n}" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("how", ["16-bit gray", "16-bit RGB"])
@pytest.mark.parametrize("mode", ["convert", "strict"])
def test_16_bit_images_are_always_errors(adapter, how, mode):
    make, sid, path = adapter
    _spoil(path, how)
    raises_data_error(lambda: make(image_mode=mode).load_image(sid), path, problem="high bit-depth image")


@pytest.mark.parametrize("how, kind", [("grayscale", "grayscale"), ("RGBA", "RGBA"), ("CMYK", "CMYK")])
def test_convertible_modes_convert_and_count_or_fail_when_strict(adapter, how, kind, caplog):
    make, sid, path = adapter
    _spoil(path, how)
    ds = make()  # image_mode=convert is the default
    img = ds.load_image(sid)
    assert img.shape == (8, 10, 3) and img.dtype == np.uint8
    ds.check(parts=("image",))
    assert sum(ds.converted.values()) == 1 and kind in next(iter(ds.converted))
    assert "converted 1" in caplog.text and "to RGB" in caplog.text
    e = raises_data_error(lambda: make(image_mode="strict").load_image(sid), path, problem="expected 8-bit RGB")
    assert e.problem.startswith(kind)


# ---- masks ------------------------------------------------------------------------------------------


def test_mask_size_differs_from_image(make_voc, make_folder, write_mask):
    voc = make_voc()
    write_mask(voc / "SegmentationClass" / "2007_000001.png", (1,), h=5, w=7)
    raises_data_error(lambda: VOCDataset(voc, "train").load("2007_000001"),
                      voc / "SegmentationClass" / "2007_000001.png", problem="mask size 7x5 (WxH) differs from its image 10x8")
    root = make_folder(masks={"cat_1": (1,)})
    write_mask(root / "masks" / "cat_1.png", (1,), h=9, w=10)
    raises_data_error(lambda: FolderDataset(root).load("cat_1", ("mask",)), root / "masks" / "cat_1.png",
                      problem="differs from its image")  # checked against the header size without decoding


@pytest.mark.parametrize("kind", ["voc", "folder"])
def test_mask_values_outside_class_range(make_voc, make_folder, kind, caplog):
    if kind == "voc":
        root = make_voc()
        ds_make, mask = (lambda **kw: VOCDataset(root, "train", **kw)), root / "SegmentationClass" / "2007_000001.png"
        sid, bad, top = "2007_000001", 21, 20
    else:
        root = make_folder(masks={"cat_1": (1,), "dog_1": (2,), "both": (1, 2)})
        ds_make, mask = (lambda **kw: FolderDataset(root, **kw)), root / "masks" / "cat_1.png"
        sid, bad, top = "cat_1", 7, 2
    m = np.zeros((8, 10), np.uint8)
    m[2, 2], m[3, 3] = bad, 255  # 255 is fine (ignore); `bad` is not a class
    write_index_png(mask, m)
    raises_data_error(lambda: ds_make().load(sid), mask, problem=f"values {{{bad}}} outside the class range 0..{top}")
    ds = ds_make(skip_bad=True).check()
    assert list(ds.skipped) == [sid] and "skipped 1 bad sample(s)" in caplog.text


def test_rgb_mask_with_foreign_colours(make_voc):
    voc = make_voc()
    p = voc / "SegmentationClass" / "2007_000001.png"
    Image.fromarray(np.full((8, 10, 3), (1, 2, 3), np.uint8)).save(p)
    raises_data_error(lambda: VOCDataset(voc, "train").load_mask("2007_000001"), p,
                      problem="colour (1,2,3) that is not in the VOC palette")


# ---- labels -----------------------------------------------------------------------------------------


def test_unknown_class_name(make_folder, caplog):
    root = make_folder(rows={"cat_1": "cat", "dog_1": "dog;unicorn", "both": "cat;dog"})
    raises_data_error(lambda: FolderDataset(root), root / "labels.csv",
                      problem="line 3 (dog_1): unknown class name 'unicorn'; known: cat, dog")
    ds = FolderDataset(root, skip_bad=True)
    assert ds.ids == ["cat_1", "both"] and list(ds.skipped) == ["dog_1"]
    assert "skipped 1 bad sample(s)" in caplog.text and "unicorn" in caplog.text
    (root / "labels.csv").unlink()
    (root / "labels.json").write_text(json.dumps({"cat_1": ["cat"], "dog_1": ["Dgo"], "both": ["cat"]}))
    raises_data_error(lambda: FolderDataset(root), root / "labels.json", problem="unknown class name 'Dgo'")


def test_unknown_class_name_in_voc_xml(make_voc):
    voc = make_voc()
    (voc / "Annotations").mkdir()
    for sid in ("2007_000001", "2007_000002"):
        (voc / "Annotations" / f"{sid}.xml").write_text("<annotation><object><name>plane</name></object></annotation>")
    raises_data_error(lambda: VOCDataset(voc, "train").load_labels("2007_000001"),
                      voc / "Annotations" / "2007_000001.xml", problem="unknown class name 'plane'")


@pytest.mark.parametrize("token, problem", [("3", "class index 3 out of range 1..2"),
                                            ("0", "class index 0 out of range 1..2 (0 is background"),
                                            ("background", "background ('background') is not an image-level label")])
def test_class_index_out_of_range(make_folder, token, problem):
    root = make_folder(rows={"cat_1": "cat", "dog_1": token})
    raises_data_error(lambda: FolderDataset(root), root / "labels.csv", problem=problem)


def test_empty_label_set(make_folder, make_voc, write_mask, caplog):
    root = make_folder(rows={"cat_1": "cat", "nothing": "", "dog_1": "dog"})
    ds = FolderDataset(root)  # reading it is fine; image-level training cannot use it
    raises_data_error(lambda: ds.check(), root / "images" / "nothing.png", problem="empty label set")
    ds = FolderDataset(root, skip_bad=True).check()
    assert ds.ids == ["cat_1", "dog_1"] and list(ds.skipped) == ["nothing"]
    assert "skipped 1 bad sample(s) of 3" in caplog.text
    voc = make_voc()
    write_mask(voc / "SegmentationClass" / "2007_000002.png", ())  # background (and 255) only
    raises_data_error(lambda: VOCDataset(voc, "train").check(), voc / "JPEGImages" / "2007_000002.jpg",
                      problem="empty label set")


def test_labels_and_images_disagree(make_folder, write_image, caplog):
    root = make_folder()
    write_image(root / "images" / "stray.png")  # an image without a row
    raises_data_error(lambda: FolderDataset(root), root / "labels.csv", problem="images/stray.png has no row")
    (root / "images" / "stray.png").unlink()
    with open(root / "labels.csv", "a") as f:
        f.write("ghost,cat\n")  # a row without an image
    raises_data_error(lambda: FolderDataset(root), root / "labels.csv", problem=f"id 'ghost' has no image in {root / 'images'}")
    ds = FolderDataset(root, skip_bad=True)
    assert "ghost" not in ds.ids and list(ds.skipped) == ["ghost"] and "skipped 1 bad sample(s)" in caplog.text


# ---- split lists and ids ----------------------------------------------------------------------------


def test_missing_split_file(make_voc, make_folder):
    voc = make_voc()
    raises_data_error(lambda: VOCDataset(voc, "trainval"), voc / "ImageSets" / "Segmentation" / "trainval.txt",
                      problem="split list for split 'trainval' not found (also looked in ImageSets/SegmentationAug")
    root = make_folder(splits={"train": ["cat_1"]})
    raises_data_error(lambda: FolderDataset(root, "val"), root / "splits" / "val.txt",
                      problem="split list not found (splits/ has: train)")


def test_duplicate_ids(make_voc, make_folder):
    voc = make_voc()
    lst = voc / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text("2007_000001\n2007_000002\n2007_000001\n")
    raises_data_error(lambda: VOCDataset(voc, "train"), lst, problem="duplicate id '2007_000001' (entries 1 and 3)")
    root = make_folder(rows={"cat_1": "cat", "dog_1": "dog"})
    with open(root / "labels.csv", "a") as f:
        f.write("cat_1.png,dog\n")
    raises_data_error(lambda: FolderDataset(root), root / "labels.csv",
                      problem="line 4: duplicate id 'cat_1' (first at line 2)")


def test_duplicate_ids_in_folder_images_and_splits(make_folder, write_image):
    root = make_folder(splits={"train": ["cat_1", "dog_1", "cat_1"]})
    raises_data_error(lambda: FolderDataset(root, "train"), root / "splits" / "train.txt",
                      problem="duplicate id 'cat_1' (entries 1 and 3)")
    write_image(root / "images" / "cat_1.jpg")  # cat_1.png exists too
    raises_data_error(lambda: FolderDataset(root, "val"), root / "images" / "cat_1", problem="two files for id 'cat_1'")


# ---- path traversal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../../x", "/etc/passwd", "JPEGImages/../../../etc/passwd", "a\\..\\b"])
def test_traversal_in_voc_split_list(make_voc, entry):
    voc = make_voc()
    lst = voc / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text(f"2007_000001\n{entry}\n")
    raises_data_error(lambda: VOCDataset(voc, "train"), f"{lst}:2", problem="is not a plain relative name")


@pytest.mark.parametrize("entry", ["../../x", "/etc/passwd", "images/../../secret"])
def test_traversal_in_folder_labels_and_split_files(make_folder, entry):
    root = make_folder()
    with open(root / "labels.csv", "a") as f:
        f.write(f"{entry},cat\n")
    raises_data_error(lambda: FolderDataset(root), root / "labels.csv", problem="is not a plain relative name")
    root2 = root.parent / "other"
    os.rename(root, root2)
    (root2 / "labels.csv").write_text("id,labels\ncat_1,cat\n")
    (root2 / "splits").mkdir()
    (root2 / "splits" / "train.txt").write_text(f"cat_1\n{entry}\n")
    raises_data_error(lambda: FolderDataset(root2, "train"), root2 / "splits" / "train.txt",
                      problem="is not a plain relative name")


def test_symlink_out_of_the_root(make_folder, make_voc, write_image, tmp_path):
    outside = write_image(tmp_path / "outside" / "secret.png")
    root = make_folder()
    (root / "images" / "cat_1.png").unlink()
    (root / "images" / "cat_1.png").symlink_to(outside)
    raises_data_error(lambda: FolderDataset(root), root / "images", problem="outside")
    voc = make_voc()
    img = voc / "JPEGImages" / "2007_000001.jpg"
    img.unlink()
    img.symlink_to(outside)
    raises_data_error(lambda: VOCDataset(voc, "train").load_image("2007_000001"),
                      voc / "ImageSets" / "Segmentation" / "train.txt", problem="outside")


def test_symlinked_layout_directories_are_allowed(make_voc, tmp_path):
    """A layout directory may itself be a symlink (how SBD's SegmentationClassAug is often added)."""
    voc = make_voc(split="train_aug")
    elsewhere = tmp_path / "sbd" / "SegmentationClassAug"
    elsewhere.parent.mkdir()
    os.rename(voc / "SegmentationClass", elsewhere)
    (voc / "SegmentationClassAug").symlink_to(elsewhere, target_is_directory=True)
    ds = VOCDataset(voc, "train_aug")
    assert ds.load_mask("2007_000001").shape == (8, 10)


def test_traversal_in_folder_labels_json_and_npy(make_folder, tmp_path):
    root = make_folder()
    (root / "labels.csv").unlink()
    (root / "labels.json").write_text(json.dumps({"cat_1": ["cat"], "/abs/path": ["dog"]}))
    raises_data_error(lambda: FolderDataset(root), root / "labels.json", problem="'/abs/path' is not a plain relative name")
    np.save(tmp_path / "l.npy", {"cat_1": np.array([1, 0]), "../up": np.array([0, 1])})
    raises_data_error(lambda: FolderDataset(root, labels_file=tmp_path / "l.npy"), tmp_path / "l.npy",
                      problem="'../up' is not a plain relative name")
