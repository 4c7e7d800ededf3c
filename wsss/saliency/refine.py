"""Full-resolution saliency from a 224-px network: flips, letterbox scales, overlapping tiles, dense CRF.

The network sees the whole image letterboxed to 224 px, so its map is coarse at VOC's ~500 px.
Each option below is independent and measured in benchmarks/bench_saliency.py:
  flip    average with the map of the mirrored image (whole-image views only);
  scales  letterbox factors <= 1 (longer side = 224 * s inside the 224 canvas), averaged;
  tiles   N >= 2: the image resized to a longer side of N * 224 and covered by 224-px windows at
          stride 112, blended with a smooth window, then mixed with the whole-image map
          (weight tile_weight), so each window adds detail while the whole image keeps context;
  crf     AuxSegNet's two-label dense CRF (`crf_for_sal`) on the final map, at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from wsss.crf.dense_crf import DenseCRF
from wsss.crf.presets import CRFParams
from wsss.saliency.model import SIZE, MEAN, STD, SaliencyNet, preprocess, unletterbox


@dataclass(frozen=True)
class ViewOptions:
    """Which network views are averaged into one map."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    tiles: int = 0  # 0 = off; N >= 2: windows over the image at a longer side of N * 224
    tile_weight: float = 0.5  # share of the tile map in the final map (the rest: whole-image views)


def predict_views(net: SaliencyNet, image: np.ndarray, opts: ViewOptions) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float32 saliency in [0, 1], averaged over the views of `opts`."""
    h, w = image.shape[:2]
    images = [image, np.ascontiguousarray(image[:, ::-1])] if opts.flip else [image]
    inputs, boxes = [], []
    for im in images:
        for s in opts.scales:
            x, box = preprocess(im, s)
            inputs.append(x)
            boxes.append(box)
    out = net.forward(np.stack(inputs))
    maps = [unletterbox(o, b, (h, w)) for o, b in zip(out, boxes)]
    if opts.flip:  # the second half of the views saw the mirrored image
        half = len(maps) // 2
        maps = maps[:half] + [m[:, ::-1] for m in maps[half:]]
    sal = np.mean(maps, axis=0)
    if opts.tiles >= 2:
        # tiles of the image as given only (flip applies to the whole-image views): as benchmarked
        sal = (1.0 - opts.tile_weight) * sal + opts.tile_weight * tile_map(net, image, opts.tiles)
    return np.clip(sal, 0.0, 1.0).astype(np.float32)


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts covering [0, length): stride apart, the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride)) + [length - size]
    return sorted(set(starts))


def _blend_window(size: int) -> np.ndarray:
    """(size, size) weights: a raised cosine that is high in the middle and small (not zero) at the edges."""
    r = 0.1 + 0.9 * np.sin(np.pi * (np.arange(size) + 0.5) / size)
    return np.outer(r, r).astype(np.float32)


def tile_map(net: SaliencyNet, image: np.ndarray, tiles: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float32: 224-px windows (stride 112) over the image resized to a longer side of tiles * 224."""
    h, w = image.shape[:2]
    s = tiles * SIZE / max(h, w)
    th, tw = max(1, round(h * s)), max(1, round(w * s))
    big = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    stride = SIZE // 2
    windows, places = [], []
    for y in _starts(th, SIZE, stride):
        for x in _starts(tw, SIZE, stride):
            crop = big[y:y + SIZE, x:x + SIZE]
            canvas = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)  # a side shorter than 224: zero padding, as the letterbox
            canvas[:crop.shape[0], :crop.shape[1]] = crop
            windows.append(((canvas.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1))
            places.append((y, x, crop.shape[0], crop.shape[1]))
    out = net.forward(np.stack(windows))
    acc = np.zeros((th, tw), np.float32)
    weight = np.zeros((th, tw), np.float32)
    win = _blend_window(SIZE)
    for o, (y, x, ch, cw) in zip(out, places):
        acc[y:y + ch, x:x + cw] += o[:ch, :cw] * win[:ch, :cw]
        weight[y:y + ch, x:x + cw] += win[:ch, :cw]
    return cv2.resize(acc / weight, (w, h), interpolation=cv2.INTER_LINEAR)


def crf_saliency(image: np.ndarray, sal: np.ndarray, params: CRFParams, tau: float = 1.05, eps: float = 1e-8) -> np.ndarray:
    """AuxSegNet's `crf_for_sal`: two-label dense CRF on a saliency map; (H, W, 3) uint8, (H, W) -> (H, W) in [0, 1].

    Unaries as in tool/imutils.py: background -log(1 - p + eps) / (tau * sigmoid(1 - p)),
    foreground -log(p + eps) / (tau * sigmoid(p)); returns the foreground marginal.
    """
    p = torch.from_numpy(np.asarray(sal, dtype=np.float32))
    q = 1.0 - p
    unary = torch.stack([-torch.log(q + eps) / (tau * torch.sigmoid(q)), -torch.log(p + eps) / (tau * torch.sigmoid(p))])
    marginals = DenseCRF(image, params).inference(unary)
    return marginals[1].numpy().astype(np.float32)


def refine_map(image: np.ndarray, sal: np.ndarray, crf: CRFParams | None) -> np.ndarray:
    """The refinement every source gets: the dense CRF when `crf` is given, else the map unchanged."""
    return sal if crf is None else crf_saliency(image, sal, crf)


def to_uint8(sal: np.ndarray) -> np.ndarray:
    """[0, 1] float map -> uint8 0..255 (rounded), the stage's PNG values."""
    return np.clip(np.rint(np.asarray(sal, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def scales_tuple(scales: Sequence[float]) -> tuple[float, ...]:
    """Scales as a plain tuple of floats (from a recipe list)."""
    return tuple(float(s) for s in scales)
