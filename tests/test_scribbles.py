"""Scribble data: the simulator, data sets with simulated scribbles and the ScribbleSup XML converter."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
from PIL import Image

from wsss.data.base import SegDataset
from wsss.data.classes import VOC_CLASSES
from wsss.data.scribble_sim import ScribbleSimulator, scribble_seed, simulate_scribbles
from wsss.data.scribblesup import convert_scribblesup, read_scribblesup_xml
from wsss.errors import ConfigError, DataError
from wsss.io.images import read_index_png, write_index_png

VOC_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc12-mini"

# The simulator aims at `fraction` of all pixels; on masks whose skeleton can carry it we require
# the result within +-15% of the target (it is usually within 5%).
BAND = 0.15


# ---- masks ------------------------------------------------------------------------------------

def _ellipse(m: np.ndarray, cls: int, center: tuple[int, int], axes: tuple[int, int], angle: float = 0) -> None:
    cv2.ellipse(m, center, axes, angle, 0, 360, int(cls), -1)


def _void_border(m: np.ndarray, width: int = 3) -> np.ndarray:
    """VOC-like: a band of 255 along every class boundary."""
    edges = np.zeros(m.shape, bool)
    edges[:, 1:] |= m[:, 1:] != m[:, :-1]
    edges[1:, :] |= m[1:, :] != m[:-1, :]
    band = cv2.dilate(edges.astype(np.uint8), np.ones((width, width), np.uint8)) > 0
    out = m.copy()
    out[band] = 255
    return out


def _masks() -> dict[str, np.ndarray]:
    """A few VOC-like masks (background 0, classes 1..20, void 255)."""
    a = np.zeros((150, 200), np.uint8)
    _ellipse(a, 15, (70, 80), (30, 55))
    _ellipse(a, 8, (160, 100), (25, 18))
    b = np.zeros((120, 160), np.uint8)
    cv2.line(b, (10, 100), (150, 20), 19, 9)  # a long diagonal "train"
    b[5:25, 5:30] = 5
    c = np.zeros((160, 160), np.uint8)
    for k in range(4):  # four instances of one class, one tiny
        _ellipse(c, 12, (30 + 35 * k, 80), (12 - 2 * k, 30 - 6 * k), 20 * k)
    d = np.full((100, 140), 11, np.uint8)  # an object filling most of the image, thin background strip
    d[:15] = 0
    return {"two_objects": _void_border(a), "diagonal": _void_border(b), "instances": _void_border(c),
            "big_object": _void_border(d), "no_void": a}


def _present(m: np.ndarray, min_pixels: int = 10) -> set[int]:
    return {int(c) for c in np.unique(m) if c != 255 and np.count_nonzero(m == c) >= min_pixels}


def _check_correct(m: np.ndarray, s: np.ndarray) -> None:
    assert s.shape == m.shape and s.dtype == np.uint8
    lab = s != 255
    assert np.array_equal(s[lab], m[lab]), "a scribble pixel carries a class other than the mask's"
    assert not lab[m == 255].any(), "a scribble pixel lies on an ignore (255) pixel"


# ---- the simulator ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(_masks()))
@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.05])
def test_fraction_near_target(name: str, fraction: float) -> None:
    m = _masks()[name]
    s = simulate_scribbles(m, fraction=fraction, seed=1)
    got = np.count_nonzero(s != 255) / m.size
    assert (1 - BAND) * fraction <= got <= (1 + BAND) * fraction, f"{name}: {got:.4f} for target {fraction}"


@pytest.mark.parametrize("name", sorted(_masks()))
@pytest.mark.parametrize("width", [1, 3, 6])
def test_labels_correct_void_free_and_every_class_covered(name: str, width: int) -> None:
    m = _masks()[name]
    for seed in range(3):
        s = simulate_scribbles(m, width=width, seed=seed)
        _check_correct(m, s)
        assert set(np.unique(s[s != 255]).tolist()) == _present(m)


def test_small_and_thin_objects_get_a_scribble() -> None:
    m = np.zeros((120, 120), np.uint8)
    m[10:14, 10:14] = 3  # 16 pixels
    m[60, 5:115] = 7  # a 1-px line
    m[100:102, 100:103] = 9  # 6 pixels: below min_pixels, an annotation artefact
    m[40:45, 60] = 255
    for fraction in (0.0, 0.03):
        s = simulate_scribbles(m, fraction=fraction, seed=4)
        _check_correct(m, s)
        assert {3, 7, 0} <= set(np.unique(s).tolist())
        assert not (s == 9).any()
    s = simulate_scribbles(m, min_pixels=1)
    assert (s == 9).any()


def test_fraction_zero_gives_minimal_strokes() -> None:
    m = _masks()["two_objects"]
    s0 = simulate_scribbles(m, fraction=0.0)
    s3 = simulate_scribbles(m, fraction=0.03)
    assert 0 < np.count_nonzero(s0 != 255) < np.count_nonzero(s3 != 255)
    assert set(np.unique(s0[s0 != 255]).tolist()) == _present(m)


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    for m in _masks().values():
        a, b = simulate_scribbles(m, seed=7), simulate_scribbles(m.copy(), seed=7)
        assert np.array_equal(a, b)
        others = [simulate_scribbles(m, seed=k) for k in (8, 9, 10)]
        assert any(not np.array_equal(a, o) for o in others)


def test_degenerate_masks() -> None:
    assert (simulate_scribbles(np.full((20, 30), 255, np.uint8)) == 255).all()
    assert (simulate_scribbles(np.zeros((3, 3), np.uint8)) == 255).all()  # 9 pixels < min_pixels
    s = simulate_scribbles(np.zeros((40, 50), np.uint8))
    assert (s[s != 255] == 0).all() and (s != 255).any()
    m32 = _masks()["two_objects"].astype(np.int32)
    assert np.array_equal(simulate_scribbles(m32), simulate_scribbles(m32.astype(np.uint8)))


def test_bad_arguments() -> None:
    m = np.zeros((10, 10), np.uint8)
    with pytest.raises(ValueError):
        simulate_scribbles(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError):
        simulate_scribbles(m.astype(np.float32))
    with pytest.raises(ValueError):
        simulate_scribbles(m, fraction=1.5)
    with pytest.raises(ValueError):
        simulate_scribbles(m, width=0)


def test_scribble_seed_is_stable() -> None:
    # a stable hash (crc32 + SeedSequence), not Python's per-process salted hash()
    assert scribble_seed(0, "2007_000032") == scribble_seed(0, "2007_000032")
    assert scribble_seed(0, "2007_000032") == 3589498697
    assert len({scribble_seed(s, i) for s in (0, 1) for i in ("a", "b", "c")}) == 6


# ---- the wrapper --------------------------------------------------------------------------------

class TinySet(SegDataset):
    """A data set of PNG files in a temporary directory."""

    def __init__(self, root: Path, ids: list[str], with_masks: bool = True):
        self.root, self.with_masks = root, with_masks
        super().__init__(ids, ["background", "cat", "dog"])

    def image_path(self, sample_id: str) -> Path:
        return self.root / "images" / f"{sample_id}.png"

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return self.root / "masks" / f"{sample_id}.png" if self.with_masks else None


def _tiny_set(tmp_path: Path, n: int = 3, with_masks: bool = True) -> TinySet:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"img_{i}" for i in range(n)]
    for i, sid in enumerate(ids):
        h, w = 48 + 8 * i, 64
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{sid}.png")
        m = np.zeros((h, w), np.uint8)
        _ellipse(m, 1 + i % 2, (30, 24), (14, 9))
        write_index_png(tmp_path / "masks" / f"{sid}.png", _void_border(m, 2))
    return TinySet(tmp_path, ids, with_masks)


def test_simulated_scribbles_replace_only_the_scribbles(tmp_path: Path) -> None:
    plain = _tiny_set(tmp_path)
    ds = _tiny_set(tmp_path).simulate_scribbles(ScribbleSimulator(fraction=0.04, width=3, seed=5))
    assert isinstance(ds, SegDataset)
    assert ds.scribbles_simulated and ds.has_scribbles and not plain.has_scribbles and not plain.scribbles_simulated
    assert ds.ids == plain.ids and ds.class_names == plain.class_names and ds.num_classes == 3
    assert ds.has_masks and not ds.has_saliency and len(ds) == 3
    sid = "img_1"
    mask = plain.load_mask(sid)
    expected = simulate_scribbles(mask, 0.04, 3, scribble_seed(5, sid))
    assert np.array_equal(ds.load_scribble(sid), expected)
    full = ds.load(sid)
    assert set(full) == {"id", "image", "labels", "mask", "scribble"}
    assert np.array_equal(full["scribble"], expected) and np.array_equal(full["mask"], mask)
    assert np.array_equal(full["labels"], plain.load_labels(sid))
    assert np.array_equal(ds[1]["scribble"], expected)
    # scribbles without the mask: the mask is read for the simulation but never handed out
    for parts in (("image", "scribble"), ("scribble",), ("labels", "scribble")):
        s = ds.load(sid, parts)
        assert "mask" not in s and np.array_equal(s["scribble"], expected)
    _check_correct(mask, expected)


def test_simulated_scribbles_check_subset_and_pickle(tmp_path: Path) -> None:
    ds = _tiny_set(tmp_path).simulate_scribbles(ScribbleSimulator(fraction=0.03, width=3, seed=0))
    assert ds.check(("image", "labels", "scribble")) is ds
    assert ds.subset(2) is ds and ds.ids == ["img_0", "img_1"]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers may pickle the data set
    assert clone.ids == ds.ids and np.array_equal(clone.load_scribble("img_0"), ds.load_scribble("img_0"))
    again = clone.simulate_scribbles(ScribbleSimulator(seed=0))  # setting it again replaces, it does not stack
    assert np.array_equal(again.load_scribble("img_0"), ds.load_scribble("img_0"))


def test_simulator_seed_changes_scribbles(tmp_path: Path) -> None:
    a = _tiny_set(tmp_path).simulate_scribbles(ScribbleSimulator(seed=0)).load_scribble("img_0")
    b = _tiny_set(tmp_path).simulate_scribbles(ScribbleSimulator(seed=1)).load_scribble("img_0")
    assert not np.array_equal(a, b)


def test_simulation_needs_masks_and_valid_settings(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ground-truth masks"):
        _tiny_set(tmp_path, with_masks=False).simulate_scribbles(ScribbleSimulator())
    with pytest.raises(ConfigError, match="data.scribbles"):
        ScribbleSimulator(fraction=1.5)


def test_simulation_checks_mask_size_against_image(tmp_path: Path) -> None:
    base = _tiny_set(tmp_path)
    write_index_png(tmp_path / "masks" / "img_0.png", np.zeros((10, 10), np.uint8))
    ds = base.simulate_scribbles(ScribbleSimulator())
    with pytest.raises(DataError, match="differs from its image"):
        ds.load("img_0", ("scribble",))


# ---- the ScribbleSup converter --------------------------------------------------------------------

def _xml(name: str, w: int, h: int, polygons: list[tuple[str, list[tuple[int, int]]]]) -> str:
    """An annotation in the layout of ScribbleSup's pascal_2012/*.xml."""
    polys = "".join(
        "\t<polygon>\n\t\t<tag>" + tag + "</tag>\n"
        + "".join(f"\t\t<point>\n\t\t\t<X>{x}</X>\n\t\t\t<Y>{y}</Y>\n\t\t</point>\n" for x, y in pts)
        + "\t</polygon>\n"
        for tag, pts in polygons)
    return (f"<annotation>\n\t<folder>anno</folder>\n\t<filename>{name}.png</filename>\n"
            f"\t<source>\n\t\t<sourceImage>PASCAL</sourceImage>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>1</segmented>\n{polys}</annotation>\n")


def _scribblesup_dirs(tmp_path: Path, files: dict[str, str], size: tuple[int, int] = (40, 30)) -> tuple[Path, Path]:
    xml_dir, img_dir = tmp_path / "pascal_2012", tmp_path / "JPEGImages"
    xml_dir.mkdir()
    img_dir.mkdir()
    for sid, text in files.items():
        (xml_dir / f"{sid}.xml").write_text(text)
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(img_dir / f"{sid}.jpg")
    return xml_dir, img_dir


def test_convert_scribblesup(tmp_path: Path) -> None:
    polys = [("plane", [(5, 10), (30, 10)]),  # ScribbleSup's short name for aeroplane
             ("background", [(20, 25)]),  # a single point: a dot
             ("person", [(39, 0), (40, 1)])]  # the last point is 1 px outside: clipped
    xml_dir, img_dir = _scribblesup_dirs(tmp_path, {"2007_000032": _xml("2007_000032", 40, 30, polys),
                                                     "2007_000033": _xml("2007_000033", 40, 30, [])})
    out = tmp_path / "pascal_2012_scribble"
    summary = convert_scribblesup(xml_dir, img_dir, out, VOC_CLASSES)
    m = read_index_png(out / "2007_000032.png", len(VOC_CLASSES))
    assert m.shape == (30, 40)
    expected = np.full((30, 40), 255, np.uint8)
    expected[9:12, 4:32] = 1  # a 3-px line through (5..30, 10)
    expected[24:27, 19:22] = 0
    assert np.array_equal(np.where(m == 15, 255, m), expected)
    assert (m == 15).any() and (m[:, :36] != 15).all()
    assert summary.written == 2 and summary.clipped_points == 1 and summary.empty == ["2007_000033.xml"]
    assert summary.labelled_pixels == np.count_nonzero(m != 255)
    assert summary.labelled_fraction == pytest.approx(summary.labelled_pixels / (2 * 40 * 30))
    assert (read_index_png(out / "2007_000033.png", 21) == 255).all()
    assert not list(out.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_read_scribblesup_xml(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_text(_xml("a", 50, 40, [("Dog", [(1, 2), (3, 4)]), ("background", [(7, 8)])]))
    size, scribbles = read_scribblesup_xml(p, {"background": 0, "dog": 12})
    assert size == (40, 50)
    assert [c for c, _ in scribbles] == [12, 0] and scribbles[0][1].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("case, text, match", [
    ("unknown class", _xml("x", 40, 30, [("sky", [(1, 1), (5, 5)])]), "unknown class 'sky'"),
    ("malformed", _xml("x", 40, 30, [("cat", [(1, 1)])])[:-30], "malformed XML"),
    ("far outside", _xml("x", 40, 30, [("cat", [(1, 1), (60, 5)])]), "outside the 40x30 image"),
    ("not a number", _xml("x", 40, 30, [("cat", [(1, 1)])]).replace("<X>1</X>", "<X>one</X>"), "not a number"),
    ("no tag", _xml("x", 40, 30, [("", [(1, 1)])]), "no <tag>"),
    ("size mismatch", _xml("x", 41, 30, [("cat", [(1, 1)])]), "<size> is 41x30"),
])
def test_convert_bad_files(tmp_path: Path, case: str, text: str, match: str) -> None:
    good = _xml("good", 40, 30, [("cat", [(1, 1), (9, 9)])])
    xml_dir, img_dir = _scribblesup_dirs(tmp_path, {"bad": text, "good": good})
    with pytest.raises(DataError, match=match) as e:
        convert_scribblesup(xml_dir, img_dir, tmp_path / "out", VOC_CLASSES)
    assert "bad.xml" in str(e.value)  # the message names the file
    summary = convert_scribblesup(xml_dir, img_dir, tmp_path / "out", VOC_CLASSES, skip_bad=True)
    assert summary.written == 1 and list(summary.skipped) == ["bad.xml"]
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "bad.png").exists()


def test_convert_missing_inputs(tmp_path: Path) -> None:
    xml_dir, img_dir = _scribblesup_dirs(tmp_path, {"a": _xml("a", 40, 30, [("cat", [(1, 1)])])})
    (img_dir / "a.jpg").unlink()
    with pytest.raises(DataError, match="no image a.jpg"):
        convert_scribblesup(xml_dir, img_dir, tmp_path / "out", VOC_CLASSES)
    (xml_dir / "a.xml").unlink()
    with pytest.raises(DataError, match="no .xml files"):
        convert_scribblesup(xml_dir, img_dir, tmp_path / "out", VOC_CLASSES)
    with pytest.raises(DataError, match="not found"):
        convert_scribblesup(tmp_path / "nope", img_dir, tmp_path / "out", VOC_CLASSES)


# ---- real masks -----------------------------------------------------------------------------------

@pytest.mark.voc
@pytest.mark.skipif(not VOC_MINI.is_dir(), reason="voc12-mini not found")
def test_simulator_on_voc12_mini_masks() -> None:
    root = VOC_MINI / "VOC2012"
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[::30]  # 11 masks
    fractions = []
    for sid in ids:
        m = read_index_png(root / "SegmentationClass" / f"{sid}.png", len(VOC_CLASSES))
        s = simulate_scribbles(m, seed=scribble_seed(0, sid))
        _check_correct(m, s)
        assert set(np.unique(s[s != 255]).tolist()) == _present(m), sid
        fractions.append(np.count_nonzero(s != 255) / m.size)
    assert all((1 - BAND) * 0.03 <= f <= (1 + BAND) * 0.03 for f in fractions), fractions
    assert abs(np.mean(fractions) - 0.03) < 0.002
