"""Multi-crop CAM inference, as PMM's `pipeline/infer_multi_crop.py` runs it (`cam_infer.mode: multicrop`).

Windows (`tool/data.py::VOC12ClsDatasetMultiCrop`): for every scale s the image is conceptually
resized to (int(W s), int(H s)) and tiled with `1 + ceil(max(0, side - crop) / stride)` windows per
axis; window i spans [i * stride, min(side, (i + 1) * stride)] except the last one, which spans
[side - crop, side] (clipped at 0), so all but the last window are only `stride` wide. Coordinates
map back to the original image by int(coordinate / s). Each window and its flip is cut from the
image and resized to crop x crop (all windows, whatever their shape: aspect ratios change).
The network's foreground maps of each crop are resized back to the window, un-flipped, summed per
pixel and divided by the per-pixel count; each present class is then min-max normalised
(values < min + 1e-5 set to 0, then (v - min) / (max - min + 1e-5)).

For a 500 x 375 image with the 10 default scales, crop 448 and stride 300 this gives 87 windows.
Differences from the official code: crops are resized with antialiased bilinear interpolation of
the normalised tensor (PIL bilinear on the uint8 image there), the maps go from feature size to the
window in one bilinear step (the official net first upsamples to 448 with align_corners=True), and
values below 0 after normalisation (only possible when a class's minimum is above zero) are clipped,
as the CAM store holds [0, 1].
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss.cam.infer import CamFn
from wsss.cam.store import write_cams
from wsss.engine import dist

log = logging.getLogger("wsss")

Window = tuple[int, int, int, int]  # x1, y1, x2, y2 in original pixels


def _axis_windows(side: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) spans along one axis of the rescaled image, in the official order."""
    count = 1 + int(math.ceil(max(0.0, float(side - crop)) / stride))
    spans = []
    for i in range(count):
        if i == count - 1:
            spans.append((max(0, side - crop), side))
        else:
            spans.append((i * stride, min(side, (i + 1) * stride)))
    return spans


def crop_windows(width: int, height: int, scales: Sequence[float], crop: int = 448, stride: int = 300) -> list[Window]:
    """Every multi-crop window (x1, y1, x2, y2) of a width x height image: scales, then columns, then rows."""
    windows = []
    for s in scales:
        w, h = int(width * s), int(height * s)
        for x1, x2 in _axis_windows(w, crop, stride):
            for y1, y2 in _axis_windows(h, crop, stride):
                windows.append((int(float(x1) / s), int(float(y1) / s), int(float(x2) / s), int(float(y2) / s)))
    return windows


@torch.inference_mode()
def multicrop_cams(cam_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, present: torch.Tensor,
                   windows: Sequence[Window], crop: int, flip: bool = True, batch_size: int = 8) -> torch.Tensor:
    """Merged multi-crop CAMs of one image.

    image (3, H, W) normalised, present (K,) foreground channel indices of the network output
    -> (K, H, W) float32 in [0, 1] (min-max normalised per class).
    """
    _, h, w = image.shape
    total = torch.zeros((len(present), h, w), device=image.device)
    count = torch.zeros((1, h, w), device=image.device)
    jobs = [(win, f) for win in windows for f in ((False, True) if flip else (False,))]
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        crops = []
        for (x1, y1, x2, y2), flipped in chunk:
            c = F.interpolate(image[None, :, y1:y2, x1:x2], size=(crop, crop), mode="bilinear",
                              align_corners=False, antialias=True)
            crops.append(c.flip(-1) if flipped else c)
        maps = cam_fn(torch.cat(crops))[:, present]
        for ((x1, y1, x2, y2), flipped), m in zip(chunk, maps):
            m = F.interpolate(m[None].float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
            total[:, y1:y2, x1:x2] += m.flip(-1) if flipped else m
            count[:, y1:y2, x1:x2] += 1
    mean = total / count.clamp(min=1)
    lo = mean.flatten(1).amin(1)[:, None, None]
    hi = mean.flatten(1).amax(1)[:, None, None]
    mean = torch.where(mean < lo + 1e-5, torch.zeros_like(mean), mean)
    return ((mean - lo) / (hi - lo + 1e-5)).clamp(0, 1)


def run_multicrop(cam_fn: CamFn, norm: torch.nn.Module, ds: Any, todo: Sequence[str], out_dir: Path,
                  device: torch.device, scales: Sequence[float], crop_size: int = 448, stride: int = 300,
                  flip: bool = True, batch_size: int = 8) -> None:
    """The cam stage's multi-crop path: write `out_dir/<id>.npz` for every id in `todo` (this rank's share)."""
    for sid in tqdm(todo, desc="cam (multi-crop)", disable=None if dist.is_main() else True, leave=False):
        sample = ds.load(sid, ("image", "labels"))
        image = norm(torch.tensor(sample["image"], device=device).permute(2, 0, 1)[None].float())[0]
        present = torch.nonzero(torch.from_numpy(sample["labels"]) > 0.5).flatten()
        h, w = image.shape[-2:]
        if len(present):
            windows = crop_windows(w, h, scales, crop_size, stride)
            maps = multicrop_cams(cam_fn, image, present.to(device), windows, crop_size, flip, batch_size).cpu().numpy()
        else:
            maps = np.zeros((0, h, w), np.float32)
        write_cams(out_dir / f"{sid}.npz", (present + 1).numpy(), maps)
