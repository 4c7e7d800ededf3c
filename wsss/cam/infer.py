"""Batched multi-scale + flip CAM inference (IRN's protocol), for the classes present in each image.

Images of equal size are batched together with their flips, so one forward pass per scale serves
the whole group; only present classes are upsampled. Output per image: (K, H, W) maps in [0, 1].
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CamFn = Callable[[torch.Tensor], torch.Tensor]  # normalised (N, 3, h, w) -> raw CAMs (N, K, h', w')


def _rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    h, w = x.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def multiscale_cams(cam_fn: CamFn, images: torch.Tensor, labels: torch.Tensor, scales: Sequence[float] = (1.0,),
                    flip: bool = True) -> list[tuple[np.ndarray, torch.Tensor]]:
    """CAMs of a batch of equally sized, normalised images.

    images (B, 3, H, W), labels (B, K) multi-hot over foreground classes -> per image
    (class indices (k,) in 1..K, maps (k, H, W) float32 in [0, 1]) for its present classes.
    """
    b, _, h, w = images.shape
    present = [torch.nonzero(labels[i] > 0.5).flatten() for i in range(b)]
    acc = [torch.zeros((len(p), h, w), device=images.device) for p in present]
    for scale in scales:
        x = _rescale(images, scale)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        cams = F.relu(cam_fn(x))
        if flip:
            cams = cams[:b] + cams[b:].flip(-1)
        for i, p in enumerate(present):
            if len(p):
                acc[i] += F.interpolate(cams[i : i + 1, p], size=(h, w), mode="bilinear", align_corners=False)[0]
    out = []
    for i, p in enumerate(present):
        maps = acc[i]
        if len(p):
            maps = maps / (maps.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)  # per-class max normalisation
        out.append(((p + 1).cpu().numpy(), maps))
    return out
