"""Frozen-encoder feature cache: compute a frozen encoder's features once, train the decoder on them.

When nothing in a segmenter's encoder trains (no trainable parameter, BatchNorm statistics fixed),
its features of an image are the same at every epoch. `fill_feature_cache` computes them once per
training image and view (a few scales, mirrored or not) and stores only the levels the decoder and
heads read, as float16 `.npy` files; training then reads them through
`wsss.data.feature_crops.CachedFeatureSet` (crops in feature space) and the network skips its encoder.

Layout: `<run>/feature_cache/<key>/meta.json`, `<id>/<view>_L<level>.npy`, and `padding_L<level>.npy`
(the features of a black image, which crops reaching beyond a view are padded with). The key hashes what the
features depend on (encoder name, weights, output stride, data set, split, views, stored levels), so
a recipe change that alters them fills a new cache and cyclic rounds reuse the same one. An image is
done when its directory exists: it is written under a temporary name and renamed, so the fill
resumes from the first missing image after a kill and shards its ids under torchrun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsss.data.base import SegDataset
from wsss.data.feature_crops import CacheLayout, default_scales, level_file, padding_file, view_image
from wsss.data.transforms import InferenceSet, collate_list, to_tensor_image
from wsss.engine import dist
from wsss.io.atomic import write_json, write_with

log = logging.getLogger("wsss")

@torch.no_grad()
def probe_levels(method: nn.Module, size: int = 128) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Which encoder levels a method's network reads, found by poisoning each with NaN: (count, levels, strides).

    method: a segmentation method with `cacheable_encoder()` and `decode_cached(x, features)` (everything
    after the encoder). It runs in eval mode, so no BatchNorm statistic sees the NaNs.
    """
    encoder = method.cacheable_encoder()
    was_training = method.training
    method.eval()
    x = torch.zeros(1, 3, size, size, device=next(encoder.parameters()).device)
    features = encoder(x)
    used = []
    for i, f in enumerate(features):
        poisoned = list(features)
        poisoned[i] = torch.full_like(f, float("nan"))
        if any(torch.isnan(v).any() for v in method.decode_cached(x, poisoned).values()):
            used.append(i)
    method.train(was_training)
    return len(features), tuple(used), tuple(round(size / features[i].shape[-2]) for i in used)


def cache_layout(method: nn.Module, scales: Sequence[float], scale_range: Sequence[float], hflip: bool) -> CacheLayout:
    """What to cache for a method: the levels its network reads (`probe_levels`), for every view of `scales`
    (empty: 3 evenly spaced over the training `scale_range`), mirrored too when training flips."""
    count, levels, strides = probe_levels(method)
    views = tuple(scales) or default_scales(tuple(scale_range))
    return CacheLayout(count, levels, strides, views, (False, True) if hflip else (False,))


# Bumped when what is stored changes for the same key parts; 2: views padded to the crops' feature grid.
CACHE_FORMAT = 2


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of what the cached features depend on (and of the cache format)."""
    payload = json.dumps({**parts, "format": CACHE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def encoder_digest(encoder: nn.Module) -> str:
    """The encoder's tensors (parameters and buffers) as a cache-key part: whatever weights it was given
    (a named checkpoint, a file, another run's segmenter through seg.init), equal tensors give equal keys."""
    h = hashlib.sha1()
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """(H, W, 3) image padded with black at the bottom and right to sides that are multiples of `multiple`.

    Why: encoders with TensorFlow "SAME" padding (timm's tf_* models, e.g. EfficientNet-Lite) pad a
    stride-2 layer's odd-sized input on both sides and an even-sized one on one side, so the feature
    grid of a whole view of odd size is shifted by a pixel or more against that of a training crop
    (a multiple of the stride), which made the stride-4 features of most views useless (benchmarks.md §15).
    Padded like the image path pads its crops, every view has the crops' grid.
    """
    h, w = image.shape[:2]
    bottom, right = -h % multiple, -w % multiple
    if not (bottom or right):
        return image
    return np.pad(image, ((0, bottom), (0, right), (0, 0)))


def image_views(encoder: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray,
                layout: CacheLayout, device: torch.device, channels_last: bool) -> dict[tuple[float, bool, int], np.ndarray]:
    """(H, W, 3) uint8 image -> {(scale, flipped, level): (C, h, w) float16} for every view and stored level."""
    out = {}
    for scale, flipped in layout.views():
        x = normalize(to_tensor_image(pad_to_multiple(view_image(image, scale, flipped), layout.alignment))[None].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            features = encoder(x)
        for level in layout.levels:
            out[(scale, flipped, level)] = features[level][0].to(torch.float16).cpu().numpy()
    return out


def padding_features(encoder: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], layout: CacheLayout,
                     device: torch.device) -> dict[int, np.ndarray]:
    """{level: (C,) float16}: the encoder's features inside a black image, what the image path's padding becomes."""
    size = 16 * layout.alignment  # the centre cell lies 8 cells from every border, out of the borders' reach
    x = normalize(torch.zeros(1, 3, size, size, device=device))
    with torch.no_grad():
        features = encoder(x)
    return {level: features[level][0, :, features[level].shape[2] // 2, features[level].shape[3] // 2]
            .to(torch.float16).cpu().numpy() for level in layout.levels}


def fill_feature_cache(encoder: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], ds: SegDataset,
                       ids: Sequence[str], cache_dir: Path, layout: CacheLayout, meta: dict[str, Any],
                       device: torch.device, num_workers: int = 0, channels_last: bool = False) -> dict[str, Any]:
    """Compute and store the features of every image in `ids` not cached yet (this process's share).

    Returns {"images", "computed", "seconds", "megabytes"}; "computed" and "seconds" over all processes.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        write_json(cache_dir / "meta.json", {**meta, "layout": layout.__dict__})
        for stale in cache_dir.glob(f".tmp-{socket.gethostname()}-*"):  # a killed fill's half-written image
            if not _alive(int(stale.name.rsplit("-", 1)[1])):  # not another run filling a shared root
                shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    todo = [sid for sid in dist.shard(list(ids)) if not (cache_dir / sid).is_dir()]
    modes = {m: m.training for m in encoder.modules()}  # restored one by one: frozen BatchNorm stays in eval
    encoder.eval()
    # what crops beyond a view are padded with: one forward pass, only when a cache lacks it
    if dist.is_main() and not all(padding_file(cache_dir, level).is_file() for level in layout.levels):
        for level, cells in padding_features(encoder, normalize, layout, device).items():
            write_with(padding_file(cache_dir, level), lambda f, a=cells: np.save(f, a))
    start = time.time()
    loader = torch.utils.data.DataLoader(InferenceSet(ds, todo, ("image",)), batch_size=1, collate_fn=collate_list,
                                         num_workers=num_workers)
    bar = tqdm(total=len(todo), desc="feature cache", disable=None if dist.is_main() else True, leave=False)
    for (sample,) in loader:
        sid = sample["id"]
        # host and pid in the name: runs sharing a cache root (seg.feature_cache.root) never touch each other's
        tmp = cache_dir / f".tmp-{socket.gethostname()}-{sid.replace('/', '__')}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        for (scale, flipped, level), cells in image_views(encoder, normalize, sample["image"], layout, device,
                                                         channels_last).items():
            np.save(level_file(tmp, scale, flipped, level), cells)
        (cache_dir / sid).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, cache_dir / sid)  # the image appears whole or not at all
        except OSError:
            if not (cache_dir / sid).is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run sharing the root finished it first
        bar.update(1)
    bar.close()
    for m, training in modes.items():
        m.training = training
    seconds = dist.all_max(time.time() - start)
    computed = int(dist.all_sum(len(todo)))
    dist.barrier()
    missing = [sid for sid in ids if not (cache_dir / sid).is_dir()]
    if missing:
        raise RuntimeError(f"feature cache: {len(missing)} images missing after the fill (e.g. {missing[0]})")
    size = sum(f.stat().st_size for f in cache_dir.rglob("*.npy"))
    return {"images": len(ids), "computed": computed, "seconds": round(seconds, 2), "megabytes": round(size / 2**20, 1)}


def _alive(pid: int) -> bool:
    """Whether a process of this machine with this pid is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cacheable_encoder(net: nn.Module) -> Optional[nn.Module]:
    """The network's encoder if it has one that never changes while training (`frozen_encoder()`), else None."""
    frozen = getattr(net, "frozen_encoder", None)
    return frozen() if callable(frozen) else None
