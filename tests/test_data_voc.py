"""VOC 2012 adapter: the real voc12-mini slice, both cls_labels formats, XML labels, SBD layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_recipe
from wsss.data import build_dataset, labels_from_mask
from wsss.data.classes import VOC_CLASSES
from wsss.data.labels import (decode_voc_int_id, encode_voc_int_id, labels_from_voc_xml, load_npy_dict,
                              read_cls_labels_npy, write_cls_labels, write_cls_labels_npy)
from wsss.data.voc import VOCDataset
from wsss.errors import DataError

# ---- the real slice ------------------------------------------------------------------------------


@pytest.mark.voc
def test_voc_mini_splits_and_sample(voc_mini):
    train = VOCDataset(voc_mini, "train")  # the folder that holds VOC2012/
    val = VOCDataset(voc_mini / "VOC2012", "val")
    assert (len(train), len(val)) == (330, 200)
    assert not set(train.ids) & set(val.ids)
    assert train.class_names == VOC_CLASSES and train.num_classes == 21
    assert train.label_source == "mask"  # no XML, no cls_labels in the slice
    assert train.has_masks and not train.has_scribbles and not train.has_saliency
    s = train[0]
    assert s["id"] == train.ids[0]
    h, w = s["image"].shape[:2]
    assert s["image"].dtype == np.uint8 and s["image"].shape == (h, w, 3) and max(h, w) <= 500
    assert s["mask"].shape == (h, w) and s["mask"].dtype == np.uint8
    assert set(np.unique(s["mask"])) <= set(range(21)) | {255}
    np.testing.assert_array_equal(s["labels"], labels_from_mask(s["mask"], 21))
    assert s["labels"].dtype == np.float32 and s["labels"].shape == (20,)


@pytest.mark.voc
def test_voc_mini_every_class_in_val(voc_mini):
    val = VOCDataset(voc_mini, "val").check(parts=("labels",))
    counts = np.sum([val.load_labels(i) for i in val.ids], axis=0)
    assert (counts >= 1).all() and not val.skipped


@pytest.mark.voc
def test_voc_mini_from_config_and_max_images(voc_mini):
    cfg = load_recipe(None, ["data.dataset=voc12", f"data.root={voc_mini}", "data.max_images=7"])
    ds = build_dataset(cfg.data, cfg.data.val_split)
    assert isinstance(ds, VOCDataset) and len(ds) == 7 and ds.split == "val"


@pytest.mark.voc
@pytest.mark.parametrize("fmt", ["irn", "toco"])
def test_voc_mini_cls_labels_roundtrip(voc_mini, tmp_path, fmt):
    ds = VOCDataset(voc_mini, "val")
    assert write_cls_labels(ds, tmp_path / "cls_labels.npy", fmt) == 200
    raw = load_npy_dict(tmp_path / "cls_labels.npy")
    written = read_cls_labels_npy(tmp_path / "cls_labels.npy", 20)
    assert len(raw) == len(written) == 200
    key = next(iter(raw))
    if fmt == "irn":
        assert isinstance(key, int) and raw[key].dtype == np.float32 and key == encode_voc_int_id(ds.ids[0])
    else:
        assert key == ds.ids[0] and raw[key].dtype == np.uint8
    ds2 = VOCDataset(voc_mini, "val", cls_labels=tmp_path / "cls_labels.npy")
    assert ds2.label_source == "cls_labels"
    for sid in ds.ids[:20]:
        np.testing.assert_array_equal(ds2.load_labels(sid), written[sid])


# ---- tiny VOC trees written by the tests -----------------------------------------------------------


def _xml(objects: list[tuple[str, int]], parts: bool = False) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        + ("<part><name>head</name></part>" if parts else "") + "</object>"
        for n, d in objects
    )
    return f"<annotation><folder>VOC2012</folder><owner><name>Jinky</name></owner>{objs}</annotation>"


def test_xml_labels_follow_irn(make_voc):
    voc = make_voc(masks={"2007_000001": (1,), "2007_000002": (12,)})
    (voc / "Annotations").mkdir()
    # difficult objects count (IRN ignores the flag); part and owner names are not objects
    (voc / "Annotations" / "2007_000001.xml").write_text(_xml([("dog", 1), ("person", 0)], parts=True))
    (voc / "Annotations" / "2007_000002.xml").write_text(_xml([("cat", 0)]))
    ds = VOCDataset(voc.parent, "train")
    assert ds.label_source == "xml"
    lab = ds.load_labels("2007_000001")
    assert [VOC_CLASSES[k + 1] for k in np.flatnonzero(lab)] == ["dog", "person"]
    # explicit mask source ignores the XML
    ds_mask = VOCDataset(voc, "train", label_source="mask")
    assert [VOC_CLASSES[k + 1] for k in np.flatnonzero(ds_mask.load_labels("2007_000001"))] == ["aeroplane"]


def test_xml_errors_name_file_and_problem(make_voc):
    voc = make_voc()
    (voc / "Annotations").mkdir()
    (voc / "Annotations" / "2007_000001.xml").write_text(_xml([("doggo", 0)]))
    (voc / "Annotations" / "2007_000002.xml").write_text("<annotation><object>")
    ds = VOCDataset(voc, "train")
    with pytest.raises(DataError, match=r"2007_000001\.xml: unknown class name 'doggo'"):
        ds.load_labels("2007_000001")
    with pytest.raises(DataError, match=r"2007_000002\.xml: not valid XML"):
        ds.load_labels("2007_000002")


@pytest.mark.parametrize("fmt", ["irn", "toco"])
def test_both_cls_labels_formats(make_voc, tmp_path, fmt):
    voc = make_voc()
    a, b = np.eye(20, dtype=np.float32)[[0, 11]]
    b = b + np.eye(20, dtype=np.float32)[14]
    if fmt == "irn":  # exactly what IRN/PSA ship: int keys, float32 vectors
        d = {2007000001: a, 2007000002: b}
    else:  # ToCo family: string keys, one-hot uint8
        d = {"2007_000001": a.astype(np.uint8), "2007_000002": b.astype(np.uint8)}
    np.save(tmp_path / "cls.npy", d)
    ds = VOCDataset(voc, "train", cls_labels=str(tmp_path / "cls.npy"))
    assert ds.label_source == "cls_labels"
    np.testing.assert_array_equal(ds.load_labels("2007_000002"), b)
    assert ds.load_labels("2007_000001").dtype == np.float32
    # the labels agree with the masks the fixture drew (classes 1 and 12 + 15)
    for sid in ds.ids:
        np.testing.assert_array_equal(ds.load_labels(sid), labels_from_mask(ds.load_mask(sid), 21))


def test_cls_labels_write_read_and_int_ids(tmp_path):
    labels = {"2007_000032": np.eye(20, dtype=np.float32)[3], "2011_003276": np.ones(20, np.float32)}
    for fmt in ("irn", "toco"):
        write_cls_labels_npy(tmp_path / f"{fmt}.npy", labels, fmt)
        back = read_cls_labels_npy(tmp_path / f"{fmt}.npy", 20)
        assert back.keys() == labels.keys()
        for k in labels:
            np.testing.assert_array_equal(back[k], labels[k])
    assert decode_voc_int_id(encode_voc_int_id("2011_003276")) == "2011_003276"
    write_cls_labels_npy(tmp_path / "alias.npy", labels, "int")  # the CLI's names for the two formats
    assert isinstance(next(iter(load_npy_dict(tmp_path / "alias.npy"))), int)
    with pytest.raises(DataError, match="not a VOC id"):
        write_cls_labels_npy(tmp_path / "x.npy", {"my_photo": np.zeros(20)}, "irn")


def test_cls_labels_file_problems(tmp_path):
    np.save(tmp_path / "short.npy", {"2007_000001": np.zeros(5)})
    with pytest.raises(DataError, match=r"short\.npy: label of '2007_000001' has shape \(5,\), expected \(20,\)"):
        read_cls_labels_npy(tmp_path / "short.npy", 20)
    np.save(tmp_path / "soft.npy", {"2007_000001": np.full(20, 0.5)})
    with pytest.raises(DataError, match=r"soft\.npy: .*values other than 0 and 1"):
        read_cls_labels_npy(tmp_path / "soft.npy", 20)
    np.save(tmp_path / "array.npy", np.zeros((3, 20)))
    with pytest.raises(DataError, match=r"array\.npy: holds a plain float64 array"):
        read_cls_labels_npy(tmp_path / "array.npy", 20)


def test_cls_labels_pickle_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    np.save(tmp_path / "evil.npy", {"2007_000001": Exploit()}, allow_pickle=True)
    with pytest.raises(DataError, match=r"evil\.npy: .*refusing to load builtins\.print"):
        load_npy_dict(tmp_path / "evil.npy")


def test_missing_ids_in_cls_labels_skip_bad(make_voc, tmp_path, caplog):
    voc = make_voc()
    np.save(tmp_path / "cls.npy", {2007000001: np.eye(20, dtype=np.float32)[0]})
    with pytest.raises(DataError, match=r"cls\.npy: no labels for 1 of the 2 ids of train\.txt \(e\.g\. 2007_000002\)"):
        VOCDataset(voc, "train", cls_labels=tmp_path / "cls.npy")
    ds = VOCDataset(voc, "train", cls_labels=tmp_path / "cls.npy", skip_bad=True)
    assert ds.ids == ["2007_000001"] and list(ds.skipped) == ["2007_000002"]
    assert "skipped them" in caplog.text


def test_train_aug_uses_sbd_masks_and_aug_list_dir(make_voc, write_mask):
    voc = make_voc(split="train_aug", list_dir="ImageSets/SegmentationAug", mask_dir="SegmentationClassAug")
    write_mask(voc / "SegmentationClass" / "2007_000001.png", (3,))  # the official mask differs on purpose
    ds = VOCDataset(voc, "train_aug")
    assert ds.mask_dir == voc / "SegmentationClassAug"
    assert 1 in ds.load_mask("2007_000001")
    # data.mask_dir overrides the automatic choice
    ds2 = VOCDataset(voc, "train_aug", mask_dir="SegmentationClass")
    assert 3 in ds2.load_mask("2007_000001")


def test_train_aug_without_sbd_has_no_masks(make_voc, tmp_path):
    voc = make_voc(split="train_aug")
    np.save(tmp_path / "cls.npy", {2007000001: np.eye(20)[0], 2007000002: np.eye(20)[1]})
    ds = VOCDataset(voc, "train_aug", cls_labels=tmp_path / "cls.npy")
    assert ds.mask_dir is None and not ds.has_masks and "mask" not in ds[0]


def test_split_as_path_scribbles_and_saliency(make_voc, write_mask, tmp_path):
    voc = make_voc()
    (tmp_path / "my_list.txt").write_text("2007_000002\n")
    write_mask(voc / "pascal_2012_scribble" / "2007_000002.png", (12,))
    (voc / "saliency").mkdir()
    Image.fromarray(np.full((8, 10), 128, np.uint8)).save(voc / "saliency" / "2007_000002.png")
    ds = VOCDataset(voc, str(tmp_path / "my_list.txt"), scribble_dir="pascal_2012_scribble", saliency_dir="saliency")
    s = ds[0]
    assert ds.ids == ["2007_000002"] and ds.has_scribbles and ds.has_saliency
    assert s["scribble"].shape == (8, 10) and 12 in s["scribble"]
    assert s["saliency"].dtype == np.float32 and abs(float(s["saliency"].mean()) - 128 / 255) < 1e-6
    with pytest.raises(DataError, match=r"nope: directory set by data.scribble_dir not found"):
        VOCDataset(voc, "train", scribble_dir="nope")


def test_root_without_voc_layout(tmp_path):
    with pytest.raises(DataError, match=r"no JPEGImages directory"):
        VOCDataset(tmp_path, "train")


def test_no_label_source_at_all(make_voc):
    voc = make_voc(split="train_aug")  # no SBD masks, no XML, no cls_labels
    with pytest.raises(DataError, match=r"no image-level labels for split 'train_aug'"):
        VOCDataset(voc, "train_aug")


def test_labels_from_voc_xml_direct(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml([("tvmonitor", 0), ("tvmonitor", 1)]))
    lab = labels_from_voc_xml(p, VOC_CLASSES)
    assert lab.sum() == 1 and lab[19] == 1


def test_sbd_style_list_lines(make_voc):
    voc = make_voc(split="train_aug", list_dir="ImageSets/SegmentationAug", mask_dir="SegmentationClassAug")
    lst = voc / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    lst.write_text("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n"
                   "/JPEGImages/2007_000002.jpg /SegmentationClassAug/2007_000002.png\n")
    assert VOCDataset(voc, "train_aug").ids == ["2007_000001", "2007_000002"]


def test_write_cls_labels_of_several_splits(make_voc, tmp_path):
    voc = make_voc()
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    dss = [VOCDataset(voc, "train"), VOCDataset(voc, "val")]
    assert write_cls_labels(dss, tmp_path / "both.npy", "str") == 2  # 2007_000002 is in both, once
    assert sorted(read_cls_labels_npy(tmp_path / "both.npy", 20)) == ["2007_000001", "2007_000002"]


def test_class_lists_for_the_cli():
    from wsss.data import classes

    assert classes.CLASS_LISTS["voc12"] == VOC_CLASSES and len(classes.CLASS_LISTS["coco14"]) == 81
    assert classes.CLASS_LISTS["shapes"][0] == "background"
