"""The bad-input matrix: every bad input a user can hand the real CLI is one line naming the file or key.

Each case builds one bad input on a tiny `folder` data set (4 images of 32 x 32 px) or on a copy of
one tiny trained run, runs the CLI in a subprocess and asserts: exit code 2, at most two lines on
stderr, the offending file or key named, no traceback, no half-written file (`.tmp-*`), every file
that existed before still byte-identical, and every file the failed command wrote whole.
(tests/test_bad_input.py checks the data adapters' messages in process; this file checks what a user
sees at the command line.)

The subprocesses: importing torch, Lightning and timm costs ~5-10 s of CPU per process, which for
75 cases would take 10 minutes. So one server process imports them once (`--serve`) and forks a child
per case that runs `wsss.cli.main(argv)` (what `python -m wsss` runs), with stdout and stderr in
files, an uncaught exception printed as a traceback with exit code 1 as the interpreter would. Set
WSSS_MATRIX_FRESH=1 to run every case as its own `python -m wsss ...` process instead (same messages,
~10x the CPU time). A full disk (ENOSPC at fsync, where it often shows) and an unwritable folder (EACCES on
creating files in it: `chmod a-w` has no effect for root) are injected into the child only, after
a given number of writes into the stage's output folder, so they strike mid-stage.

docs/reliability.md holds the table of cases (input, command, message) with the messages the CLI
printed; regenerate it with `python -m tests.test_bad_inputs_matrix --write` (each case checks its
row, test_reliability_doc_lists_the_cases the list).

Cost: ~80 s of CPU in all (one core), most of it the shared imports and the tiny trained run.
Robustness: run three times in a row (in the background, with tests/test_resume.py after it) beside
two CPU-bound processes (`nice -n 19 python -c 'while True: pass'` twice) on a shared 2-core machine
at a load of 15-30: 76 passed each time (11-13 min of wall time each at that load).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python -m tests.test_bad_inputs_matrix` and the server import this tree

from wsss.io.images import write_index_png  # noqa: E402

RECIPE = "configs/folder_example.yaml"  # found in wsss's configs/ from any working directory
# Every case runs in its own directory with the data at mydata/ and runs at runs/ (relative paths, so
# a copy of the trained run has the same config hash as the original).
TINY = ["data.root=mydata", "run.root=runs", "run.name=base", "cam.backbone.name=test_resnet",
        "seg.encoder.name=test_resnet", "cam.max_steps=2", "seg.max_steps=1", "cam.batch_size=2", "seg.batch_size=2",
        "cam.crop_size=32", "seg.crop_size=32", "cam_infer.scales=[1.0]", "cam_infer.flip=false", "cam_infer.batch_size=1",
        "trainer.num_workers=0", "trainer.threads=1", "trainer.accelerator=cpu"]
IDS = ("a", "b", "c", "d")  # c is in both splits: the image every "bad image" case spoils
ROWS = {"a": "cat", "b": "dog", "c": "cat;dog", "d": "dog"}
SIZE = 32
SEED_BYTES = np.random.default_rng(17).bytes(600)  # "random bytes", the same in every run (messages quote them)


# ---- the tiny data set and spoilers --------------------------------------------------------------------


def _rgb(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(sid: str, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    for i, name in enumerate(ROWS[sid].split(";")):
        m[4 + 12 * i : 14 + 12 * i, 6:26] = 1 if name == "cat" else 2
    return m


def make_data(root: Path) -> Path:
    """root/images (JPEG), labels.csv, classes.txt, masks/, scribbles/, saliency/, splits/{train,val}.txt."""
    for i, sid in enumerate(IDS):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(i)).save(root / "images" / f"{sid}.jpg", quality=95)
        write_index_png(root / "masks" / f"{sid}.png", _mask(sid))
        scribble = np.full((SIZE, SIZE), 255, np.uint8)
        scribble[8, 8:24] = _mask(sid)[8, 8:24]
        write_index_png(root / "scribbles" / f"{sid}.png", scribble)
        (root / "saliency").mkdir(exist_ok=True)
        Image.fromarray((_mask(sid) > 0).astype(np.uint8) * 255).save(root / "saliency" / f"{sid}.png")
    (root / "labels.csv").write_text("id,labels\n" + "".join(f"{k},{v}\n" for k, v in ROWS.items()))
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\nc\nd\n")
    (root / "splits" / "val.txt").write_text("c\nd\n")
    return root


def _png(path: Path, w: int, h: int, depth: int, color_type: int, rows: bytes) -> None:
    """A hand-written PNG (a bomb header must not be encoded for real)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _put(path: Path, data: bytes) -> Path:
    """Replace a file (a new inode: never write through into another copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


IMAGE_SPOILERS: dict[str, tuple[str, str]] = {  # kind -> (file name written, description)
    "corrupt": ("c.jpg", "corrupt JPEG (random bytes)"),
    "truncated": ("c.jpg", "truncated JPEG (first half of the file)"),
    "zero-byte": ("c.jpg", "zero-byte image"),
    "huge": ("c.png", "huge dimensions (PNG header claims 100000 x 100000 px)"),
    "16-bit": ("c.png", "wrong mode (16-bit grayscale PNG)"),
}


def spoil_image(folder: Path, kind: str) -> Path:
    """Replace folder/c.jpg by a bad image of `kind`; return its path."""
    good = folder / "c.jpg"
    data = good.read_bytes()
    good.unlink()
    path = folder / IMAGE_SPOILERS[kind][0]
    if kind == "corrupt":
        _put(path, SEED_BYTES)
    elif kind == "truncated":
        _put(path, data[: len(data) // 2])
    elif kind == "zero-byte":
        _put(path, b"")
    elif kind == "huge":
        _png(path, 100_000, 100_000, 8, 2, b"\x00" * 64)
    elif kind == "16-bit":
        Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(path, format="PNG")
    return path


# ---- cases -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: `build(case_dir)` spoils a fresh copy of the data (and of the trained run if
    `run`), then `wsss *argv` runs in case_dir and must fail with one line containing every `expect`."""

    id: str
    input: str  # what is wrong, for the table
    argv: tuple[str, ...]
    build: Callable[[Path], None]
    expect: tuple[str, ...]
    run: bool = False  # start from a copy of the trained run (cam/, cams/, pseudo/, seg/)
    fault: Optional[dict] = None  # injected into the child: {"kind": "enospc"|"eacces", "under": dir, "after": n}
    drop: tuple[str, ...] = ()  # outputs removed from the run copy first, so the stage runs again

    @property
    def command(self) -> str:
        """The command as a user would type it (the tiny-run overrides left out)."""
        return "wsss " + " ".join(a for a in self.argv if a not in TINY)


def _stage(command: str, *extra: str) -> tuple[str, ...]:
    return (command, RECIPE, *TINY, *extra)


def _nothing(case_dir: Path) -> None:
    pass


def _image_cases() -> list[Case]:
    """Each bad image in each command that reads images."""
    cases = []
    for kind, (name, what) in IMAGE_SPOILERS.items():
        named = f"mydata/images/{name}"
        cases.append(Case(f"image-{kind}-data-check", what, ("data", "check", RECIPE, *TINY),
                          lambda d, k=kind: spoil_image(d / "mydata" / "images", k), (named,)))
        workers = ("trainer.num_workers=1",) if kind == "corrupt" else ()  # a DataError inside a DataLoader worker
        cases.append(Case(f"image-{kind}-train-cam", what + (", read in a DataLoader worker" if workers else ""),
                          _stage("train-cam", *workers), lambda d, k=kind: spoil_image(d / "mydata" / "images", k),
                          (named,)))
        cases.append(Case(f"image-{kind}-cam", what, _stage("cam"), lambda d, k=kind: spoil_image(d / "mydata" / "images", k),
                          (named,), run=True, drop=("cams", "pseudo")))
        cases.append(Case(f"image-{kind}-predict", what, _stage("predict", "--input", "in", "--output", "out"),
                          lambda d, k=kind: spoil_image(_copy_images(d), k), (f"in/{name}",), run=True))
        cases.append(Case(f"image-{kind}-evaluate", what, _stage("evaluate"),
                          lambda d, k=kind: spoil_image(d / "mydata" / "images", k), (named,), run=True))
    return cases


def _copy_images(case_dir: Path) -> Path:
    """in/ = a copy of the data set's images: the input folder of `wsss predict`."""
    shutil.copytree(case_dir / "mydata" / "images", case_dir / "in")
    return case_dir / "in"


def _write(rel: str, text: str | bytes, encoding: str = "utf-8") -> Callable[[Path], None]:
    def build(case_dir: Path) -> None:
        _put(case_dir / rel, text if isinstance(text, bytes) else text.encode(encoding))
    return build


def _append(rel: str, text: str) -> Callable[[Path], None]:
    def build(case_dir: Path) -> None:
        with open(case_dir / rel, "a") as f:
            f.write(text)
    return build


def _symlink_out(case_dir: Path) -> None:
    outside = case_dir / "outside"
    outside.mkdir()
    Image.fromarray(_rgb(9)).save(outside / "secret.jpg")
    (case_dir / "mydata" / "images" / "c.jpg").unlink()
    (case_dir / "mydata" / "images" / "c.jpg").symlink_to(outside / "secret.jpg")


def _label_and_list_cases() -> list[Case]:
    check = ("data", "check", RECIPE, *TINY)
    header = "id,labels\n"
    return [
        Case("labels-unknown-class", "labels.csv: unknown class name", check,
             _write("mydata/labels.csv", header + "a,cat\nb,dgo\nc,cat;dog\nd,dog\n"), ("mydata/labels.csv", "'dgo'")),
        Case("labels-duplicate-id", "labels.csv: the same id twice", check,
             _append("mydata/labels.csv", "b,cat\n"), ("mydata/labels.csv", "duplicate id 'b'")),
        Case("labels-empty-id", "labels.csv: a row with an empty id", check,
             _append("mydata/labels.csv", ",cat\n"), ("mydata/labels.csv",)),
        Case("labels-empty-labels", "labels.csv: an image with no label (empty cell)", check,
             _write("mydata/labels.csv", header + "a,cat\nb,\nc,cat;dog\nd,dog\n"), ("mydata/images/b.jpg",)),
        Case("labels-utf16", "labels.csv: wrong encoding (UTF-16)", check,
             _write("mydata/labels.csv", header + "a,cat\nb,dog\nc,cat;dog\nd,dog\n", "utf-16"), ("mydata/labels.csv", "UTF-8")),
        Case("classes-latin1", "classes.txt: wrong encoding (Latin-1)", check,
             _write("mydata/classes.txt", "background\ncat\ndog\nchèvre\n", "latin-1"), ("mydata/classes.txt", "UTF-8")),
        Case("split-latin1", "splits/train.txt: wrong encoding (Latin-1)", check,
             _write("mydata/splits/train.txt", "a\nb\nc\nd\nçà\n", "latin-1"), ("mydata/splits/train.txt", "UTF-8")),
        Case("split-empty-lines-only", "splits/train.txt: empty lines only", check,
             _write("mydata/splits/train.txt", "\n\n\n"), ("mydata/splits/train.txt", "empty")),
        Case("split-dotdot", "splits/train.txt: an entry with ../", check,
             _append("mydata/splits/train.txt", "../outside/secret\n"), ("mydata/splits/train.txt", "../outside/secret")),
        Case("split-absolute", "splits/train.txt: an absolute path", check,
             _append("mydata/splits/train.txt", "/etc/passwd\n"), ("mydata/splits/train.txt", "/etc/passwd")),
        Case("labels-dotdot", "labels.csv: an id with ../", check,
             _append("mydata/labels.csv", "../outside/secret,cat\n"), ("mydata/labels.csv", "../outside/secret")),
        Case("image-symlink-out", "images/c.jpg: a symlink out of the data root", check,
             _symlink_out, ("mydata/images",)),
    ]


def _annotation_cases() -> list[Case]:
    check = ("data", "check", RECIPE, *TINY)
    small = np.zeros((SIZE // 2, SIZE), np.uint8)

    def index_png(rel: str, arr: np.ndarray) -> Callable[[Path], None]:
        return lambda d: (_put(d / rel, b""), write_index_png(d / rel, arr))

    def rgb_png(rel: str, colour: tuple[int, int, int]) -> Callable[[Path], None]:
        return lambda d: (_put(d / rel, b""), Image.fromarray(np.full((SIZE, SIZE, 3), colour, np.uint8)).save(d / rel))

    def gray_png(rel: str, arr: np.ndarray) -> Callable[[Path], None]:
        return lambda d: (_put(d / rel, b""), Image.fromarray(arr).save(d / rel))

    def pred_gt(spoil: Callable[[Path], None]) -> Callable[[Path], None]:
        def build(d: Path) -> None:
            for sid in IDS:
                write_index_png(d / "gt" / f"{sid}.png", _mask(sid))
                write_index_png(d / "pred" / f"{sid}.png", _mask(sid))
            spoil(d)
        return build

    folders = ("evaluate", "--pred", "pred", "--gt", "gt", "--classes", "mydata/classes.txt")
    return [
        Case("mask-wrong-size", "masks/c.png: wrong size", check, index_png("mydata/masks/c.png", small),
             ("mydata/masks/c.png", "differs from its image")),
        Case("mask-foreign-colour", "masks/c.png: RGB colour outside the palette", check,
             rgb_png("mydata/masks/c.png", (1, 2, 3)), ("mydata/masks/c.png", "palette")),
        Case("mask-class-out-of-range", "masks/c.png: class index 7 of 3 classes", check,
             index_png("mydata/masks/c.png", np.full((SIZE, SIZE), 7, np.uint8)), ("mydata/masks/c.png", "{7}")),
        Case("scribble-wrong-size", "scribbles/c.png: wrong size", check, index_png("mydata/scribbles/c.png", small),
             ("mydata/scribbles/c.png", "differs from its image")),
        Case("scribble-foreign-colour", "scribbles/c.png: RGB colour outside the palette", check,
             rgb_png("mydata/scribbles/c.png", (1, 2, 3)), ("mydata/scribbles/c.png", "palette")),
        Case("saliency-wrong-size", "saliency/c.png: wrong size", check, gray_png("mydata/saliency/c.png", small),
             ("mydata/saliency/c.png", "differs from its image")),
        Case("prediction-wrong-size", "pred/c.png: prediction of the wrong size", folders,
             pred_gt(index_png("pred/c.png", small)), ("pred/c.png", "differs from its ground-truth mask")),
        Case("prediction-foreign-colour", "pred/c.png: RGB colour outside the palette", folders,
             pred_gt(rgb_png("pred/c.png", (1, 2, 3))), ("pred/c.png", "palette")),
        Case("prediction-missing", "pred/: a ground-truth mask without prediction", folders,
             pred_gt(lambda d: (d / "pred" / "c.png").unlink()), ("pred/c.png", "missing")),
    ]


def write_other_weights(directory: Path) -> None:
    """other.{pth,safetensors,ckpt}: the weights of another architecture (timm resnet10t) in each format."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "other.safetensors"))
    torch.save(state, directory / "other.pth")
    torch.save({"state_dict": state, "epoch": 3}, directory / "other.ckpt")  # a Lightning-style checkpoint


def _torch_weights(case_dir: Path, kind: str, name: str) -> None:
    """files/<name>: random bytes, or (copied from the shared set) weights of another architecture."""
    path = case_dir / "files" / name
    if kind == "random":
        _put(path, SEED_BYTES)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(case_dir.parent / "_base" / "weights" / name, path)


def _weights_cases() -> list[Case]:
    cases = []
    for ext in (".pth", ".safetensors", ".ckpt"):
        for kind, what, expect in (("random", "random bytes", "cannot load" if ext != ".safetensors" else "not a valid"),
                                   ("other", "weights of another architecture (resnet10t)", "does not match this model")):
            name = f"{kind}{ext}"
            cases.append(Case(f"weights-{kind}-{ext[1:]}", f"cam.backbone.weights: {what}, {ext}",
                              _stage("train-cam", f"cam.backbone.weights=files/{name}"),
                              lambda d, k=kind, n=name: _torch_weights(d, k, n), (f"files/{name}", expect)))
    cases += [
        Case("resume-ckpt-random", "last.ckpt of an interrupted run: random bytes", _stage("train-cam"),
             _write("runs/base/cam/checkpoints/last.ckpt", SEED_BYTES), ("runs/base/cam/checkpoints/last.ckpt", "delete it")),
        Case("run-weights-random", "the run's trained cam/model.safetensors: random bytes", _stage("cam"),
             _write("runs/base/cam/model.safetensors", SEED_BYTES), ("runs/base/cam/model.safetensors",),
             run=True, drop=("cams", "pseudo")),
        Case("run-seg-weights-random", "the run's trained seg/model.safetensors: random bytes",
             _stage("predict", "--input", "in", "--output", "out"),
             lambda d: (_copy_images(d), _put(d / "runs/base/seg/model.safetensors", SEED_BYTES)),
             ("runs/base/seg/model.safetensors",), run=True),
    ]
    return cases


def _recipe_cases() -> list[Case]:
    check = ("data", "check", RECIPE, *TINY)
    bad_yaml = f"defaults: [{REPO / RECIPE}]\nseg:\n  learning_rate: 0.1\n"
    return [
        Case("override-unknown-key", "override: unknown key (seg.learning_rate)", (*check, "seg.learning_rate=0.1"),
             _nothing, ("seg.learning_rate", "did you mean: seg.lr")),
        Case("recipe-unknown-key", "recipe file: unknown key (seg.learning_rate)", ("data", "check", "bad.yaml", *TINY),
             _write("bad.yaml", bad_yaml), ("bad.yaml", "seg.learning_rate", "seg.lr")),
        Case("override-wrong-type-list", "override: a number where a list is expected", (*check, "seg.scale_range=0.5"),
             _nothing, ("seg.scale_range", "expected a list")),
        Case("override-wrong-type-number", "override: text where a number is expected", (*check, "seg.lr=fast"),
             _nothing, ("seg.lr", "expected a number")),
        Case("override-bad-choice", "override: a value not among the choices", (*check, "seg.loss.name=focal"),
             _nothing, ("seg.loss.name", "'focal'")),
        Case("override-no-equals", "override without '='", (*check, "seg.lr"), _nothing, ("seg.lr", "key=value")),
        Case("override-out-of-range", "override: a number out of its range", (*check, "seg.crop_size=0"), _nothing,
             ("seg.crop_size", ">= 1, got 0")),
        Case("override-bad-method-option", "override: a bad option of the chosen method",
             (*check, "cam.method=group", "cam.group.group_size=0"), _nothing, ("cam.group", "group_size (0)")),
        Case("seg-init-missing", "seg.init: a folder without a trained segmenter", (*check, "seg.init=nowhere"),
             _nothing, ("seg.init", "nowhere", "no model.safetensors")),
        Case("recipe-missing", "recipe file not found", ("data", "check", "nothere.yaml", *TINY), _nothing,
             ("nothere.yaml", "not found")),
        Case("recipe-bad-yaml", "recipe file: not valid YAML", ("data", "check", "bad.yaml", *TINY),
             _write("bad.yaml", "seg: [unclosed\n"), ("bad.yaml", "YAML")),
        Case("data-root-missing", "data.root does not exist", (*check, "data.root=nowhere"), _nothing,
             ("data.root", "nowhere")),
        Case("classes-file-missing", "data.classes_file not found", (*check, "data.classes_file=nothere.txt"), _nothing,
             ("data.classes_file", "nothere.txt")),
        Case("weights-file-missing", "cam.backbone.weights: file not found", _stage("train-cam", "cam.backbone.weights=files/nothere.pth"),
             _nothing, ("cam.backbone.weights", "files/nothere.pth")),
    ]


STAGE_OUT = {"cam": "runs/base/cams", "pseudo": "runs/base/pseudo", "evaluate": "runs/base/pred", "predict": "out"}


def _disk_cases() -> list[Case]:
    """A full disk mid-stage and an unwritable output folder, at each per-image stage."""
    cases = []
    for stage, out in STAGE_OUT.items():
        argv = _stage(stage, "--input", "in", "--output", "out") if stage == "predict" else _stage(stage)
        build = _copy_images if stage == "predict" else _nothing
        drop = {"cam": ("cams", "pseudo"), "pseudo": ("pseudo",), "evaluate": ("pred", "metrics"), "predict": ()}[stage]
        cases.append(Case(f"disk-full-{stage}", f"full disk (ENOSPC) after the first file of {out}/", argv, build,
                          (out, "no space left on device"), run=True, drop=drop,
                          fault={"kind": "enospc", "under": out, "after": 1}))
        cases.append(Case(f"unwritable-{stage}", f"{out}/ not writable (EACCES)", argv, build,
                          (out, "cannot write"), run=True, drop=drop, fault={"kind": "eacces", "under": out, "after": 0}))
    cases.append(Case("unwritable-run-root", "run.root is not writable (EACCES)", _stage("cam"), _nothing,
                      ("runs", "not writable"), fault={"kind": "eacces", "under": "runs", "after": 0}))
    return cases


CASES: list[Case] = (_image_cases() + _label_and_list_cases() + _annotation_cases() + _weights_cases()
                     + _recipe_cases() + _disk_cases())


# ---- running the CLI ---------------------------------------------------------------------------------


def _inject(fault: Optional[dict], case_dir: Path) -> None:
    """In the child only: make writes under case_dir/fault["under"] fail after fault["after"] files."""
    if not fault:
        return
    under = os.path.realpath(case_dir / fault["under"])
    inside = lambda p: os.path.realpath(p) == under or os.path.realpath(p).startswith(under + os.sep)  # noqa: E731
    count = {"n": 0}
    if fault["kind"] == "enospc":  # the n-th finished file's fsync fails: a full disk mid-stage
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if inside(os.readlink(f"/proc/self/fd/{fd}")):
                count["n"] += 1
                if count["n"] > fault["after"]:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        os.fsync = fsync
    else:  # the folder exists; creating a file or folder in it is refused, as without write permission
        os.makedirs(under, exist_ok=True)
        real_open, real_mkdir = os.open, os.mkdir

        def open_(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and inside(os.path.dirname(os.path.abspath(path))) and not os.path.exists(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if inside(os.path.dirname(os.path.abspath(path))) and not os.path.exists(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        os.open, os.mkdir = open_, mkdir


def _child(argv: list[str], case_dir: Path, fault: Optional[dict]) -> int:
    """What the interpreter does for `python -m wsss ARGV`: run main, exit code from SystemExit, traceback
    and code 1 for anything else."""
    import traceback

    os.chdir(case_dir)
    _inject(fault, case_dir)
    sys.argv = ["wsss", *argv]
    try:
        from wsss.cli import main

        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    """Read {"argv", "dir", "fault", "out", "err"} lines; run each in a forked child; answer {"code"}."""
    reply = os.fdopen(os.dup(1), "w")  # answers on a private copy of stdout; anything printed goes to stderr
    os.dup2(2, 1)
    import importlib

    for module in ("lightning", "timm", "segmentation_models_pytorch", "wsss.cli", "wsss.stages.train_cam",
                   "wsss.stages.cam", "wsss.stages.pseudo", "wsss.stages.train_seg", "wsss.stages.evaluate",
                   "wsss.tools.predict", "wsss.registry"):  # the expensive imports, once (only a speed-up: a moved module is fine)
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    for line in sys.stdin:
        job = json.loads(line)
        if "weights" in job:  # in a child too: the server itself never runs torch ops (fork-safe)
            reply.flush()
            pid = os.fork()
            if pid == 0:
                write_other_weights(Path(job["weights"]))
                os._exit(0)
            os.waitpid(pid, 0)
            reply.write("{}\n")
            reply.flush()
            continue
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns into this loop
            code = 1
            try:
                with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                sys.stdin = open(os.devnull)
                code = _child(job["argv"], Path(job["dir"]), job["fault"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


class Runner:
    """Runs `wsss ARGV` in a directory: through the preloaded server, or fresh processes (WSSS_MATRIX_FRESH=1)."""

    def __init__(self) -> None:
        self.fresh = os.environ.get("WSSS_MATRIX_FRESH") == "1"
        # this tree's wsss; a progress bar that would reach stderr is drawn at every step, not only on a slow machine
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}
        self.server: Optional[subprocess.Popen] = None
        if not self.fresh:
            self.server = subprocess.Popen([sys.executable, "-m", "tests.test_bad_inputs_matrix", "--serve"], cwd=REPO,
                                           env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, argv: tuple[str, ...], case_dir: Path, fault: Optional[dict] = None) -> tuple[int, str, str]:
        out, err = case_dir.parent / f"{case_dir.name}.stdout", case_dir.parent / f"{case_dir.name}.stderr"
        if self.server is None:
            cmd = [sys.executable, "-m", "wsss", *argv]
            if fault:  # the same process with the fault injected first
                cmd = [sys.executable, "-c", "import json, sys; from pathlib import Path; from tests.test_bad_inputs_matrix "
                       "import _child; sys.exit(_child(sys.argv[3:], Path(sys.argv[1]), json.loads(sys.argv[2])))",
                       str(case_dir), json.dumps(fault), *argv]
            with open(out, "wb") as o, open(err, "wb") as e:
                rc = subprocess.run(cmd, cwd=REPO if fault else case_dir, env=self.env, stdout=o, stderr=e,
                                    timeout=600).returncode
        else:
            self.server.stdin.write(json.dumps({"argv": list(argv), "dir": str(case_dir), "fault": fault,
                                                "out": str(out), "err": str(err)}) + "\n")
            self.server.stdin.flush()
            answer = self.server.stdout.readline()
            if not answer:
                raise RuntimeError("the CLI server died")
            rc = json.loads(answer)["code"]
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace")

    def make_weights(self, directory: Path) -> None:
        """write_other_weights(directory) in a process that has torch and timm loaded."""
        if self.server is None:
            subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tests.test_bad_inputs_matrix "
                            "import write_other_weights; write_other_weights(Path(sys.argv[1]))", str(directory)],
                           cwd=REPO, env=self.env, check=True)
        else:
            self.server.stdin.write(json.dumps({"weights": str(directory)}) + "\n")
            self.server.stdin.flush()
            self.server.stdout.readline()

    def close(self) -> None:
        if self.server is not None:  # idle between jobs, its children all reaped: nothing to shut down cleanly
            self.server.stdin.close()
            self.server.kill()
            self.server.wait()


class World:
    """The shared tiny data set and one tiny trained run; `prepare(case)` gives each case its own copy."""

    def __init__(self, root: Path, runner: Runner):
        self.root, self.runner = root, runner
        base = root / "_base"
        make_data(base / "mydata")
        code, out, err = runner(("run", RECIPE, *TINY, "--stages", "train_cam,cam,pseudo,train_seg"), base)
        if code != 0:
            raise RuntimeError(f"the tiny run failed (code {code}):\n{out[-2000:]}\n{err[-3000:]}")
        runner.make_weights(base / "weights")
        self.base = base

    def prepare(self, case: Case) -> Path:
        case_dir = self.root / case.id
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        shutil.copytree(self.base / "mydata", case_dir / "mydata", symlinks=True)
        if case.run:
            shutil.copytree(self.base / "runs", case_dir / "runs", symlinks=True)
            manifest = json.loads((case_dir / "runs/base/manifest.json").read_text())
            for sub in case.drop:
                shutil.rmtree(case_dir / "runs/base" / sub, ignore_errors=True)
            stages = {"cams": "cam", "pseudo": "pseudo", "pred": "evaluate", "metrics": "evaluate"}
            for sub in case.drop:
                manifest["stages"].pop(stages.get(sub, sub), None)
            (case_dir / "runs/base/manifest.json").write_text(json.dumps(manifest))
        case.build(case_dir)
        return case_dir


def snapshot(case_dir: Path) -> dict[str, str]:
    """rel path -> sha256 of every file under case_dir (what must survive a failed command)."""
    return {str(p.relative_to(case_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(case_dir.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_whole(path: Path) -> None:
    """A file the failed command wrote must be complete: it parses."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            [z[k] for k in z.files]
    elif path.suffix in (".png", ".jpg"):
        with Image.open(path) as im:
            im.load()
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        load_file(str(path))


# Files a command may rewrite while failing: its bookkeeping (the manifest records the failed stage,
# config.yaml is rewritten identically, logs are appended).
BOOKKEEPING = re.compile(r"(^|/)(manifest\.json|config\.yaml)$|(^|/)logs/")


def normalise(text: str, case_dir: Path) -> str:
    """Temporary directories replaced, so the table reads as if run in the data set's parent folder."""
    text = text.replace(str(case_dir.resolve()) + "/", "").replace(str(case_dir) + "/", "")
    return text.replace(str(REPO) + "/", "")


def run_case(case: Case, world: World) -> str:
    """Build and run one case; assert the contract; return the (normalised) message."""
    case_dir = world.prepare(case)
    before = snapshot(case_dir)
    code, out, err = world.runner(case.argv, case_dir, case.fault)
    lines = [line for line in err.splitlines() if line.strip()]
    shown = f"[{case.id}] code {code}\nstderr:\n{err[-3000:]}\nstdout:\n{out[-1500:]}"
    assert code == 2, shown
    assert "Traceback" not in err + out, shown
    assert 1 <= len(lines) <= 2, shown
    message = normalise(lines[-1], case_dir)
    for word in case.expect:
        assert word in message, f"{word!r} not named\n{shown}"
    after = snapshot(case_dir)
    temporaries = [p for p in after if Path(p).name.startswith(".tmp-")]
    assert not temporaries, f"half-written files left: {temporaries}\n{shown}"
    changed = [p for p, h in before.items() if after.get(p) != h and not BOOKKEEPING.search(p)]
    assert not changed, f"earlier outputs changed or removed: {changed}\n{shown}"
    for p in set(after) - set(before):
        assert_whole(case_dir / p)
    return message


# ---- the tests -----------------------------------------------------------------------------------------

DOC = REPO / "docs" / "reliability.md"
REGENERATE = "regenerate it: python -m tests.test_bad_inputs_matrix --write"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    runner = Runner()
    try:
        yield World(tmp_path_factory.mktemp("matrix"), runner)
    finally:
        runner.close()


@pytest.mark.slow  # ~1 s a case, plus ~15-50 s for the shared imports and the tiny trained run
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World) -> None:
    message = run_case(case, world)
    documented = {row[0]: row[3] for row in parse_table(DOC.read_text())}.get(case.id)
    assert documented == _cell(message), f"docs/reliability.md has {documented}, the CLI printed {message}; {REGENERATE}"


def test_reliability_doc_lists_the_cases() -> None:
    """docs/reliability.md lists exactly these cases in this order (each case checks its message)."""
    rows = parse_table(DOC.read_text())
    assert [r[:3] for r in rows] == [(c.id, _cell(c.input), _cell(c.command)) for c in CASES], REGENERATE


# ---- the table in docs/reliability.md -------------------------------------------------------------------

BEGIN, END = "<!-- matrix:begin (generated) -->", "<!-- matrix:end -->"


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else ""


def table(messages: dict[str, str]) -> str:
    lines = ["| case | input | command | message (stderr) |", "|---|---|---|---|"]
    for c in CASES:
        lines.append(f"| {c.id} | {_cell(c.input)} | {_cell(c.command)} | {_cell(messages[c.id])} |")
    return "\n".join(lines)


def parse_table(doc: str) -> list[tuple[str, str, str, str]]:
    body = doc.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(tuple(cells))
    return rows


def main(args: list[str]) -> None:
    if args == ["--serve"]:
        serve()
        return
    if args and args[0] in ("--markdown", "--write"):
        runner = Runner()
        messages = {}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                world = World(Path(tmp), runner)
                for case in CASES:
                    messages[case.id] = run_case(case, world)
                    print(f"{case.id}: {messages[case.id]}", file=sys.stderr)
        finally:
            runner.close()
        text = table(messages)
        if args[0] == "--markdown":
            print(text)
        else:
            doc = REPO / "docs" / "reliability.md"
            old = doc.read_text()
            doc.write_text(old.split(BEGIN, 1)[0] + BEGIN + "\n" + text + "\n" + END + old.split(END, 1)[1])
        return
    raise SystemExit("usage: python -m tests.test_bad_inputs_matrix --markdown | --write | --serve")


if __name__ == "__main__":
    main(sys.argv[1:])
