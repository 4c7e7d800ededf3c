"""Shared fixtures. Data set builders write tiny images into tmp_path (a few pixels each)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import pytest
from PIL import Image

from wsss.io.images import write_index_png

REPO = Path(__file__).resolve().parents[1]


def tiny_shapes(num_train: int = 24, num_val: int = 8, size: int = 64, steps: int = 3, batch: int = 8) -> list[str]:
    """Overrides that make any shapes recipe a seconds-long run: few tiny images, a tiny timm network,
    a few steps, no loader workers. End-to-end tests add what they test on top."""
    return [f"data.shapes.num_train={num_train}", f"data.shapes.num_val={num_val}", f"data.shapes.image_size={size}",
            "cam.backbone.name=test_resnet", "seg.encoder.name=test_resnet", "cam.backbone.weights=none",
            "seg.encoder.weights=none", f"cam.max_steps={steps}", f"seg.max_steps={steps}", f"cam.batch_size={batch}",
            f"seg.batch_size={batch}", f"cam.crop_size={size}", f"seg.crop_size={size}", "cam_infer.scales=[1.0, 0.5]",
            "trainer.num_workers=0", "trainer.threads=1", "report.samples=2"]


@pytest.fixture
def one_torch_thread():
    """Run a test single-threaded: on a shared 2-core machine OpenMP's spin-waiting makes many tiny
    tensor ops (CRF, lattice filtering) several times slower with two threads (docs/methods/crf.md)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- data sets ---------------------------------------------------------------------------------

H, W = 8, 10  # every tiny test image is 8 x 10


def _write_image(path: Path, h: int = H, w: int = W, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _write_mask(path: Path, classes: tuple[int, ...] = (1,), h: int = H, w: int = W) -> Path:
    """An index PNG with background plus one vertical band per class."""
    m = np.zeros((h, w), dtype=np.uint8)
    for i, c in enumerate(classes):
        m[:, 2 * i + 1 : 2 * i + 3] = c
    m[0, 0] = 255
    write_index_png(path, m)
    return path


def _make_voc(tmp_path: Path, masks: Mapping[str, tuple[int, ...]] = {"2007_000001": (1,), "2007_000002": (12, 15)},
              split: str = "train", list_dir: str = "ImageSets/Segmentation", mask_dir: str = "SegmentationClass",
              name: str = "VOCdevkit") -> Path:
    """VOCdevkit/VOC2012 with JPEGs, masks and a split list; returns the VOC2012 directory."""
    voc = tmp_path / name / "VOC2012"
    for i, (sid, classes) in enumerate(masks.items()):
        _write_image(voc / "JPEGImages" / f"{sid}.jpg", seed=i)
        _write_mask(voc / mask_dir / f"{sid}.png", classes)
    (voc / list_dir).mkdir(parents=True, exist_ok=True)
    (voc / list_dir / f"{split}.txt").write_text("".join(f"{sid}\n" for sid in masks))
    return voc


def _make_folder(tmp_path: Path, rows: Optional[Mapping[str, str]] = None,
                 classes: Optional[tuple[str, ...]] = ("background", "cat", "dog"),
                 masks: Mapping[str, tuple[int, ...]] = {}, splits: Mapping[str, list[str]] = {},
                 ext: str = ".png") -> Path:
    """root/images, labels.csv (`id,labels`), classes.txt, optional masks/ and splits/; returns root."""
    root = tmp_path / "mydata"
    rows = {"cat_1": "cat", "dog_1": "dog", "both": "cat;dog"} if rows is None else rows
    for i, sid in enumerate(rows):
        _write_image(root / "images" / f"{sid}{ext}", seed=i)
    (root / "labels.csv").write_text("id,labels\n" + "".join(f"{sid},{lab}\n" for sid, lab in rows.items()))
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for sid, cls in masks.items():
        _write_mask(root / "masks" / f"{sid}.png", cls)
    for name, ids in splits.items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """write_image(path, h=8, w=10, seed=0): a random RGB image (format from the suffix)."""
    return _write_image


@pytest.fixture
def write_mask() -> Callable[..., Path]:
    """write_mask(path, classes=(1,), h=8, w=10): an index PNG with one band per class."""
    return _write_mask


@pytest.fixture
def make_voc(tmp_path: Path) -> Callable[..., Path]:
    """make_voc(masks={id: classes}, split=..., list_dir=..., mask_dir=...) -> tiny VOC2012 dir."""
    return lambda **kw: _make_voc(tmp_path, **kw)


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """make_folder(rows={id: 'cat;dog'}, classes=(...), masks={id: classes}, splits={name: ids}) -> root."""
    return lambda **kw: _make_folder(tmp_path, **kw)


VOC_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc12-mini"


@pytest.fixture
def voc_mini() -> Path:
    """The real VOC 2012 slice in ../shared (skips when absent)."""
    if not (VOC_MINI / "VOC2012" / "JPEGImages").is_dir():
        pytest.skip(f"{VOC_MINI} not present")
    return VOC_MINI
