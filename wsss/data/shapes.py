"""`shapes`: a seeded, VOC-like synthetic data set that makes the demo and the tests run anywhere.

Each image holds 1 to 3 objects on a textured background with clutter. An object is a blob-shaped
"body" plus a small "head" marker. The head's pattern and colour name the class; the body's colour
only leans towards its class (class hues overlap, and clutter blobs without heads share the same
colours). So, as on real photographs, a classifier finds the small discriminative part first and
its CAM covers only part of the object: the methods in this project have something to fix.

Objects occlude each other and clutter may occlude them; image-level labels list the classes with
enough visible pixels. Every sample also carries a noisy saliency map (blurred foreground with
holes, plus false alarms on clutter) and simulated scribbles (wsss.data.scribble_sim).

Generation is deterministic for (seed, split, index, image_size) and writes a cache directory once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from wsss.data.base import SegDataset, read_id_list
from wsss.io.images import encode_index_png

log = logging.getLogger(__name__)

CLASS_NAMES = ["background", "disc", "ring", "cross", "bars", "checker", "triangle"]
GENERATOR_VERSION = 4  # bump when the drawing changes, so old caches are not reused

MIN_VISIBLE_PIXELS = 40  # (at 96 px) an object with fewer visible pixels is not labelled
_HEAD_HUES = [0.0, 0.16, 0.33, 0.55, 0.72, 0.88]  # one saturated head colour per class
HEAD_RADIUS = (6.0, 7.5)  # (at 96 px) the discriminative part is small
BODY_HUE_SIGMA = 0.04  # body hue ~ class hue + N(0, sigma): leans towards the class, clutter shares hues
CLUTTER_CLASS_HUE = 0.0  # probability that a clutter blob takes a class's body hue (else any hue)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] -> RGB float (3,)."""
    hsv = np.uint8([[[int(h % 1.0 * 179), int(s * 255), int(v * 255)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape (size, size, channels)."""
    grid = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    up = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return up.reshape(size, size, channels).clip(-1, 1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: colour gradient + smooth noise + optional stripes, (S, S, 3) float."""
    c0 = _hsv(rng.uniform(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.95))
    c1 = _hsv(rng.uniform(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.95))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += 40 * _smooth_noise(rng, size, int(rng.integers(3, 9)), 3)
    if rng.uniform() < 0.4:  # stripes or grid: texture that a colour-only model confuses with objects
        period = rng.uniform(5, 14) * size / 96
        phase = rng.uniform(0, 2 * math.pi)
        a2 = rng.uniform(0, math.pi)
        stripes = np.sin((np.cos(a2) * xx + np.sin(a2) * yy) * size * 2 * math.pi / period + phase)
        img += rng.uniform(10, 30) * stripes[..., None]
    return img


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, rot: float) -> np.ndarray:
    """A wobbly ellipse as an (n, 2) int polygon."""
    n = 28
    ang = np.linspace(0, 2 * math.pi, n, endpoint=False)
    wobble = 1 + 0.12 * np.sin(ang * rng.integers(2, 5) + rng.uniform(0, 6)) + rng.normal(0, 0.03, n)
    x = rx * wobble * np.cos(ang)
    y = ry * wobble * np.sin(ang)
    xr = cx + x * math.cos(rot) - y * math.sin(rot)
    yr = cy + x * math.sin(rot) + y * math.cos(rot)
    return np.stack([xr, yr], 1).round().astype(np.int32)


def _head_mask(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    cv2.circle(m, (int(round(cx)), int(round(cy))), max(2, int(round(r))), 1, -1)
    return m.astype(bool)


def _draw_head(img: np.ndarray, cls: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """Draw the class-specific head marker; return its full (unoccluded) pixel mask."""
    size = img.shape[0]
    disc = _head_mask(size, cx, cy, r)
    hue = _HEAD_HUES[cls - 1] + rng.normal(0, 0.015)
    fg = _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    dark = fg * 0.25
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    rr = np.sqrt(dx**2 + dy**2)
    if cls == 1:  # disc: solid
        pattern = disc
    elif cls == 2:  # ring: outer ring, dark centre
        pattern = disc & (rr > 0.5 * r)
    elif cls == 3:  # cross
        pattern = disc & ((np.abs(dx) < 0.3 * r) | (np.abs(dy) < 0.3 * r))
    elif cls == 4:  # bars: horizontal stripes
        pattern = disc & (np.floor((dy + r) / max(1.5, r / 2.5)) % 2 == 0)
    elif cls == 5:  # checker
        cell = max(1.5, r / 2)
        pattern = disc & ((np.floor((dx + r) / cell) + np.floor((dy + r) / cell)) % 2 == 0)
    else:  # triangle pointing up, on a dark disc
        pattern = disc & (dy < 0.6 * r) & (np.abs(dx) < (dy + r) * 0.6)
    img[disc] = dark
    img[pattern] = fg
    return disc


def generate_sample(seed: int, size: int, num_classes: int = len(CLASS_NAMES)) -> dict[str, np.ndarray]:
    """Draw one sample: image (S,S,3) uint8, mask (S,S) uint8, saliency (S,S) float32."""
    rng = np.random.default_rng(seed)
    s = size / 96.0
    img = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    clutter_mask = np.zeros((size, size), bool)
    n_obj = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    classes = rng.choice(np.arange(1, num_classes), size=n_obj, replace=rng.uniform() < 0.25)
    n_clutter = int(rng.integers(1, 4))
    # depth order: objects and clutter interleaved, later ones in front
    items = [("obj", int(c)) for c in classes] + [("clutter", 0)] * n_clutter
    order = rng.permutation(len(items))
    full_areas: dict[int, tuple[int, np.ndarray]] = {}
    instance = np.zeros((size, size), np.int16)  # which item owns each pixel (for occlusion checks)
    for depth, k in enumerate(order, start=1):
        kind, cls = items[k]
        is_obj = kind == "obj"
        rx = rng.uniform(11, 19) * s if is_obj else rng.uniform(6, 15) * s
        ry = rx * rng.uniform(0.45, 0.8)
        cx, cy = rng.uniform(rx * 0.7, size - rx * 0.7), rng.uniform(ry * 0.7, size - ry * 0.7)
        rot = rng.uniform(0, math.pi)
        poly = _blob_polygon(rng, cx, cy, rx, ry, rot)
        body = np.zeros((size, size), np.uint8)
        cv2.fillPoly(body, [poly], 1)
        body = body.astype(bool)
        # body colour: leans towards the class hue but overlaps neighbours; clutter takes any hue
        if is_obj:
            hue = _HEAD_HUES[cls - 1] + rng.normal(0, BODY_HUE_SIGMA)
        elif rng.uniform() < CLUTTER_CLASS_HUE:
            hue = _HEAD_HUES[int(rng.integers(len(_HEAD_HUES)))] + rng.normal(0, BODY_HUE_SIGMA)
        else:
            hue = rng.uniform()
        colour = _hsv(hue, rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.85))
        tex = 1 + 0.18 * _smooth_noise(rng, size, 6)[..., 0]
        layer = colour[None, None] * tex[..., None] + rng.normal(0, 6, (size, size, 1)).astype(np.float32)
        if rng.uniform() < 0.3:  # some bodies are striped, whatever their class
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
            layer *= (1 + 0.2 * np.sin((xx * math.cos(rot) + yy * math.sin(rot)) / (2.2 * s)))[..., None]
        img[body] = layer[body]
        region = body.copy()
        if is_obj:
            # head at one end of the major axis, slightly outside the body
            end = rng.choice([-1, 1])
            hx = cx + end * 0.95 * rx * math.cos(rot)
            hy = cy + end * 0.95 * rx * math.sin(rot)
            hx, hy = float(np.clip(hx, 4 * s, size - 4 * s)), float(np.clip(hy, 4 * s, size - 4 * s))
            head = _draw_head(img, cls, hx, hy, rng.uniform(*HEAD_RADIUS) * s, rng)
            region |= head
            mask[region] = cls
            full_areas[depth] = (cls, head)
        else:
            mask[region] = 0
            clutter_mask |= region
        instance[region] = depth
    # objects must stay recognisable: unlabel those whose head is mostly hidden (they become clutter-like)
    for depth, (cls, head) in full_areas.items():
        visible = instance == depth
        if (visible & head).sum() < 0.5 * head.sum() or visible.sum() < MIN_VISIBLE_PIXELS * s * s:
            mask[visible] = 0
            clutter_mask |= visible
    clutter_mask &= mask == 0  # clutter hidden behind a later object is not clutter any more
    image = np.clip(img, 0, 255).astype(np.uint8)
    saliency = _noisy_saliency(rng, mask > 0, clutter_mask, size)
    return {"image": image, "mask": mask, "saliency": saliency}


def _noisy_saliency(rng: np.random.Generator, fg: np.ndarray, clutter: np.ndarray, size: int) -> np.ndarray:
    """A saliency map like an off-the-shelf detector's: blurry, with holes and false alarms."""
    s = size / 96.0
    sal = fg.astype(np.float32)
    holes = _smooth_noise(rng, size, 5)[..., 0] > 0.45  # misses parts of objects
    sal[holes] *= 0.3
    if clutter.any():
        sal = np.maximum(sal, clutter.astype(np.float32) * rng.uniform(0.3, 0.8))  # salient distractors
    k = int(2 * round(2.5 * s) + 1)
    sal = cv2.GaussianBlur(sal, (k, k), 0)
    sal += 0.08 * _smooth_noise(rng, size, 8)[..., 0] + rng.normal(0, 0.03, (size, size)).astype(np.float32)
    return sal.clip(0, 1).astype(np.float32)


# ---- the data set -----------------------------------------------------------------------------

def _cache_key(cfg: Any) -> str:
    from wsss.data.scribble_sim import SIMULATOR_VERSION

    payload = json.dumps({"v": GENERATOR_VERSION, "scribbles": SIMULATOR_VERSION, "n_train": cfg.num_train, "n_val": cfg.num_val,
                          "size": cfg.image_size, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    return Path(os.environ.get("WSSS_CACHE", ".cache/wsss")).expanduser()


def build_shapes(root: Path, cfg: Any, scribble_cfg: Any | None = None) -> Path:
    """Generate the data set into `root/shapes-<key>/` once (atomically); return that directory."""
    out = Path(root) / f"shapes-{_cache_key(cfg)}"
    if (out / "done").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-shapes-", dir=out.parent))
    try:
        for sub in ("images", "masks", "saliency", "scribbles"):
            (tmp / sub).mkdir()
        from wsss.data.scribble_sim import simulate_scribbles

        splits = {"train": cfg.num_train, "val": cfg.num_val}
        labels: dict[str, list[int]] = {}
        for split, n in splits.items():
            ids = []
            for i in range(n):
                sid = f"{split}_{i:05d}"
                seed = int(hashlib.sha256(f"{cfg.seed}/{split}/{i}".encode()).hexdigest()[:8], 16)
                smp = generate_sample(seed, cfg.image_size)
                cv2.imwrite(str(tmp / "images" / f"{sid}.png"), smp["image"][..., ::-1])
                (tmp / "masks" / f"{sid}.png").write_bytes(encode_index_png(smp["mask"]))
                cv2.imwrite(str(tmp / "saliency" / f"{sid}.png"), (smp["saliency"] * 255).round().astype(np.uint8))
                scrib = simulate_scribbles(smp["mask"], seed=seed % (2**31))
                (tmp / "scribbles" / f"{sid}.png").write_bytes(encode_index_png(scrib))
                labels[sid] = sorted(int(c) for c in np.unique(smp["mask"]) if 0 < c < len(CLASS_NAMES))
                ids.append(sid)
            (tmp / f"{split}.txt").write_text("\n".join(ids) + "\n")
        (tmp / "labels.json").write_text(json.dumps(labels))
        (tmp / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
        (tmp / "done").write_text("ok\n")
        if out.exists():  # a concurrent process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class ShapesDataset(SegDataset):
    """The synthetic set read back from its cache: every sample has mask, scribble and saliency."""

    allow_empty_labels = True  # a few images have all objects hidden; they are still valid negatives

    def __init__(self, directory: Path, split: str, **kwargs: Any):
        self.dir = Path(directory)
        ids = read_id_list(self.dir / f"{split}.txt")
        self._labels = json.loads((self.dir / "labels.json").read_text())
        super().__init__(ids, CLASS_NAMES, source=self.dir / f"{split}.txt", **kwargs)

    @classmethod
    def from_config(cls, data_cfg: Any, split: str) -> "ShapesDataset":
        if split not in ("train", "val"):
            from wsss.errors import DataError

            raise DataError(None, f"shapes has splits 'train' and 'val', not {split!r}")
        root = Path(data_cfg.root).expanduser() if data_cfg.root else default_cache_root()
        directory = build_shapes(root, data_cfg.shapes)
        return cls(directory, split, image_mode=data_cfg.image_mode, max_pixels=data_cfg.max_pixels,
                   skip_bad=data_cfg.skip_bad)

    def image_path(self, sample_id: str) -> Path:
        return self.dir / "images" / f"{sample_id}.png"

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return self.dir / "masks" / f"{sample_id}.png"

    def scribble_path(self, sample_id: str) -> Optional[Path]:
        return self.dir / "scribbles" / f"{sample_id}.png"

    def saliency_path(self, sample_id: str) -> Optional[Path]:
        return self.dir / "saliency" / f"{sample_id}.png"

    def _load_labels(self, sample_id: str) -> np.ndarray:
        labels = np.zeros(len(CLASS_NAMES) - 1, np.float32)
        for c in self._labels[sample_id]:
            labels[c - 1] = 1
        return labels
