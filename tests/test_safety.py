"""Untrusted files: checkpoints load without running pickled code and must fit the model (errors name
the keys); run names, predict and crf folders cannot lead reads or writes out of their roots; every
decode path is bounded. (The data adapters' list and label files: tests/test_bad_input.py.)"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cam.store import write_cams
from wsss.cli import main
from wsss.config import load_recipe
from wsss.data.classes import VOC_CLASSES
from wsss.engine.export import export_net, load_weights
from wsss.stages.common import cam_method, seg_method
from wsss.engine.rundir import RunDir
from wsss.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.shapes.num_train=8", "data.shapes.num_val=4", "data.shapes.image_size=64",
        "cam.backbone.name=test_resnet", "seg.encoder.name=test_resnet", "cam.max_steps=2", "cam.batch_size=4",
        "cam.crop_size=64", "trainer.num_workers=0", "trainer.threads=1", "trainer.checkpoint_every_steps=1"]
SHAPES = ["background", "disc", "ring", "cross", "bars", "checker", "triangle"]


def _base(tmp: Path, name: str = "r", *extra: str) -> list[str]:
    return ["configs/shapes_cam.yaml", f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", f"run.name={name}",
            *TINY, *extra]


def _error(capsys, args: list[str]) -> str:
    """Run the CLI; it must stop with exit code 2 and one clear error line (no traceback)."""
    with pytest.raises(SystemExit) as err:
        main(args)
    msg = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in msg, msg
    return msg


class _Payload:
    """Unpickling this runs os.system: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trap(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    return path


@pytest.fixture
def exported(tmp_path) -> RunDir:
    """A prepared run with untrained CAM and seg networks exported (no training needed here)."""
    cfg = load_recipe(REPO / "configs" / "shapes_cam.yaml", _base(tmp_path)[1:])
    rd = RunDir(cfg).prepare()
    torch.manual_seed(0)
    export_net(cam_method(cfg, 7).net, rd.sub("cam"), "cam", cfg.cam, SHAPES)
    export_net(seg_method(cfg, SHAPES).net, rd.sub("seg"), "seg", cfg.seg, SHAPES)
    return rd


# ---- checkpoints ------------------------------------------------------------------------------------


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _trap(tmp_path / "runs" / "r" / "cam" / "checkpoints" / "last.ckpt", marker)  # Lightning's resume path
    msg = _error(capsys, ["train-cam", *_base(tmp_path)])
    assert "last.ckpt: cannot load checkpoint safely" in msg
    trap = _trap(tmp_path / "evil.pth", marker)  # a backbone weights file
    msg = _error(capsys, ["train-cam", *_base(tmp_path, "w", f"cam.backbone.weights={trap}")])
    assert "evil.pth: cannot load with weights_only=True" in msg
    assert not marker.exists()


def test_trained_weights_replaced_by_a_pickle_are_refused(exported, tmp_path):
    marker = tmp_path / "pwned"
    _trap(exported.sub("cam", "model.safetensors"), marker)
    net = cam_method(exported.cfg, 7).net
    with pytest.raises(CheckpointError, match="unreadable weights file"):
        load_weights(net, exported.sub("cam"), "cam", SHAPES)
    assert not marker.exists()


def test_weights_of_another_backbone_name_the_keys(exported):
    cfg = load_recipe(REPO / "configs" / "shapes_cam.yaml", [*TINY, "cam.backbone.name=resnet10t"])
    with pytest.raises(CheckpointError) as err:
        load_weights(cam_method(cfg, 7).net, exported.sub("cam"), "cam", SHAPES)
    msg = str(err.value)
    assert "model.safetensors does not match this model" in msg and "another recipe or backbone" in msg
    assert "shape mismatch: backbone.conv1.0.weight (16, 3, 3, 3) vs (24, 3, 3, 3)" in msg, msg


def test_weights_for_another_class_count_name_the_keys(exported):
    cfg = exported.cfg
    with pytest.raises(CheckpointError) as err:  # a shapes model (6 foreground classes) on VOC (20)
        load_weights(cam_method(cfg, 21).net, exported.sub("cam"), "cam", list(VOC_CLASSES))
    msg = str(err.value)
    assert "shape mismatch: classifier.weight (6, " in msg and "vs (20, " in msg, msg
    assert "trained for 7 classes (background, disc, ring, cross, ...), this data set has 21" in msg
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*segmentation_head.*\(7,.* vs \(21,"):
        load_weights(seg_method(cfg, list(VOC_CLASSES)).net, exported.sub("seg"), "seg", list(VOC_CLASSES))


def test_resume_checkpoint_of_another_backbone_names_the_keys(tmp_path, capsys):
    main(["train-cam", *_base(tmp_path, "a")])
    other = tmp_path / "runs" / "b" / "cam" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copy(tmp_path / "runs" / "a" / "cam" / "checkpoints" / "last.ckpt", other / "last.ckpt")
    msg = _error(capsys, ["train-cam", *_base(tmp_path, "b", "cam.backbone.name=resnet10t")])
    assert "last.ckpt: checkpoint of another recipe or backbone (shape mismatch: net.backbone.conv1.0.weight" in msg, msg


# ---- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "/tmp/wsss-abs-run", "a/../../escaped", "link/x"])
def test_run_name_cannot_leave_run_root(tmp_path, capsys, name):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    msg = _error(capsys, ["cam", *_base(tmp_path, name)])
    assert "run.name" in msg and "run.root" in msg, msg
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/wsss-abs-run").exists()
    assert not any((tmp_path / "elsewhere").iterdir())


def _bomb(path: Path) -> Path:
    """A PNG whose header claims 100000 x 100000 pixels (a few hundred bytes on disk)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_refuses_paths_out_of_its_folders_and_bombs(exported, tmp_path, capsys):
    base = _base(tmp_path)
    inp, out = tmp_path / "in", tmp_path / "out"
    _image(inp / "a.png")
    (inp / "b.png").symlink_to(_image(tmp_path / "secret" / "b.png"))
    msg = _error(capsys, ["predict", *base, "--input", str(inp), "--output", str(out)])
    assert f"{inp / 'b.png'}: input image path resolves outside {inp}" in msg, msg
    (inp / "b.png").unlink()
    _image(inp / "a.jpg")
    msg = _error(capsys, ["predict", *base, "--input", str(inp), "--output", str(out)])
    assert "two images named 'a'" in msg
    (inp / "a.jpg").unlink()
    out.mkdir()
    (out / "overlay").symlink_to(tmp_path / "secret", target_is_directory=True)
    msg = _error(capsys, ["predict", *base, "--input", str(inp), "--output", str(out)])
    assert "overlay folder path resolves outside" in msg
    (out / "overlay").unlink()
    _bomb(inp / "c.png")
    msg = _error(capsys, ["predict", *base, "--input", str(inp), "--output", str(out)])
    assert f"{inp / 'c.png'}: image is 100000x100000" in msg and "decompression bomb" in msg, msg
    assert sorted(p.name for p in (tmp_path / "secret").iterdir()) == ["b.png"]  # nothing written out there


def test_crf_refuses_files_symlinked_out_of_its_folders_and_bombs(tmp_path, capsys):
    cams, images, out, secret = tmp_path / "cams", tmp_path / "images", tmp_path / "out", tmp_path / "secret"

    def crf_error() -> str:
        shutil.rmtree(out, ignore_errors=True)  # each attempt starts without outputs (they would be skipped)
        return _error(capsys, ["crf", "--cams", str(cams), "--images", str(images), "--output", str(out),
                               "--iterations", "1"])

    for sid in ("x", "y"):
        _image(images / f"{sid}.png")
    write_cams(cams / "x.npz", np.array([1]), np.full((1, 16, 16), 0.5, np.float32))
    write_cams(secret / "y.npz", np.array([1]), np.full((1, 16, 16), 0.5, np.float32))
    (cams / "y.npz").symlink_to(secret / "y.npz")
    assert f"{cams / 'y.npz'}: CAM file path resolves outside {cams}" in crf_error()
    (cams / "y.npz").unlink()
    (images / "x.png").unlink()
    (images / "x.png").symlink_to(_image(secret / "x.png"))
    assert f"{images / 'x.png'}: image path resolves outside {images}" in crf_error()
    (images / "x.png").unlink()
    _bomb(images / "x.png")
    assert "possible decompression bomb" in crf_error()
    assert not list(out.glob("*.png"))


def test_evaluate_folders_decodes_with_bounds(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    _bomb(tmp_path / "pred" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "gt" / "a.png")
    msg = _error(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--dataset", "shapes"])
    assert "possible decompression bomb" in msg, msg



@pytest.mark.parametrize("content, cause", [
    (np.random.default_rng(0).bytes(500), "not a torch checkpoint, or corrupt: Unsupported operand"),
    (b"", "empty or truncated file"),
    (b"PK\x03\x04" + bytes(200), "corrupt or truncated file: PytorchStreamReader failed reading zip archive"),
    ("pickle", "it holds pickled Python objects, not only tensors: Trying to load unsupported GLOBAL"),
])
def test_unloadable_weights_give_the_cause_not_torchs_unsafe_advice(tmp_path, content, cause):
    """torch's message for a file weights_only=True refuses starts with "re-running with weights_only=False
    will likely succeed": wrong for random bytes, and unsafe advice. We keep only the cause, in one line."""
    from wsss.engine.trainer import AtomicCheckpointIO
    from wsss.models.backbones import load_state_dict_file

    path = tmp_path / "x.pth"
    if content == "pickle":
        _trap(path, tmp_path / "pwned")
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_file(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot load with weights_only=True ({cause}") and "\n" not in msg, msg
    assert "weights_only=False" not in msg and "likely succeed" not in msg
    with pytest.raises(CheckpointError) as err:
        AtomicCheckpointIO().load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot load checkpoint safely ({cause}") and "\n" not in msg, msg
    assert msg.endswith("); delete it to train from the start") and "likely succeed" not in msg
    assert not (tmp_path / "pwned").exists()


def test_random_bytes_as_safetensors_name_the_file(tmp_path):
    from wsss.models.backbones import load_state_dict_file

    path = tmp_path / "x.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(CheckpointError, match=rf"^{path}: not a valid \.safetensors file \(Error while deserializing header"):
        load_state_dict_file(path)
