"""SEAM-style CAM training objective, as PMM's `pipeline/train_cam.py::train` computes it.

Two views per batch: x and x downscaled by `view_scale` (0.3). With label vector y' = [1, y]
(background always on) and hat = max-normalised map times y':
  cls = 1/2 sum_v MLSM(GAP(cam_v)[fg], y) + amp_weight * 1/2 sum_v AMP(cam_rv_v * y')
  er  = mean |hat(cam_1) rescaled to view 2 - hat(cam_2)| over foreground channels (equivariance)
  ecr = sum over (a, b) in {(1, 2), (2, 1)} of the mean of the top `ecr_topk` fraction of
        |max_onehot(hat(cam_b)).detach() - hat(cam_rv_a)|, background channel = 1 - max foreground
  loss = cls + er + ecr
Network outputs are first upsampled to their view's input size (align_corners=True), as the
official forward does, so every term lives at input resolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def max_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel min-max normalisation of relu(x): (N, C, H, W) -> relu(x - min - eps) / (max - min + eps)."""
    x = F.relu(x)
    lo = x.flatten(2).amin(2)[..., None, None]
    hi = x.flatten(2).amax(2)[..., None, None]
    return F.relu(x - lo - eps) / (hi - lo + eps)


def adaptive_min_pooling(cam_fg: torch.Tensor) -> torch.Tensor:
    """AMP: (N, K, H, W) label-masked foreground maps -> mean of relu over the hw/4 weakest per-pixel maxima."""
    n = cam_fg.shape[0]
    strongest = cam_fg.amax(1).flatten(1)
    k = strongest.shape[1] // 4
    weakest = torch.topk(strongest, k, dim=1, largest=False).values
    return F.relu(weakest).sum() / (k * n)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) normalised maps -> the same with channel 0 replaced by 1 - max over foreground channels."""
    return torch.cat([1.0 - cam[:, 1:].amax(1, keepdim=True), cam[:, 1:]], 1)


def max_onehot(cam: torch.Tensor) -> torch.Tensor:
    """Zero every foreground channel below the per-pixel foreground maximum; background is kept."""
    fg = cam[:, 1:]
    fg = torch.where(fg != fg.amax(1, keepdim=True), torch.zeros_like(fg), fg)
    return torch.cat([cam[:, :1], fg], 1)


def ohem_l1(target: torch.Tensor, pred: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest `fraction` of |target - pred| entries of each sample (N, C, H, W) -> scalar."""
    diff = (target - pred).abs().flatten(1)
    k = max(1, int(diff.shape[1] * fraction))
    return torch.topk(diff, k, dim=1).values.mean()


def view_terms(net: Any, x: torch.Tensor, labels: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One view x (N, 3, H, W) -> (cam, cam_rv) at input size (N, C, H, W), its MLSM loss and its AMP loss;
    labels (N, C-1) multi-hot, y (N, C, 1, 1) with background 1."""
    out = net(x)
    size = x.shape[-2:]
    cam = F.interpolate(out["cam"], size, mode="bilinear", align_corners=True)
    cam_rv = F.interpolate(out["cam_rv"], size, mode="bilinear", align_corners=True)
    mlsm = F.multilabel_soft_margin_loss(cam.mean((2, 3))[:, 1:], labels.to(cam.dtype))
    amp = adaptive_min_pooling((cam_rv * y)[:, 1:])
    return cam, cam_rv, mlsm, amp


def seam_loss(net: Any, x: torch.Tensor, labels: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x (N, 3, H, W) normalised, labels (N, C-1) multi-hot foreground -> (loss, {cls, amp, er, ecr})."""
    n = x.shape[0]
    y = torch.cat([torch.ones(n, 1, device=x.device, dtype=labels.dtype), labels], 1).to(x.dtype)[..., None, None]
    x2 = F.interpolate(x, scale_factor=cfg.view_scale, mode="bilinear", align_corners=True)
    (cam1, rv1, mlsm1, amp1), (cam2, rv2, mlsm2, amp2) = (view_terms(net, xv, labels, y) for xv in (x, x2))
    small = cam2.shape[-2:]
    hat1 = F.interpolate(max_norm(cam1), small, mode="bilinear", align_corners=True) * y
    hat_rv1 = F.interpolate(max_norm(rv1), small, mode="bilinear", align_corners=True) * y
    hat2 = max_norm(cam2) * y
    hat_rv2 = max_norm(rv2) * y
    er = (hat1[:, 1:] - hat2[:, 1:]).abs().mean()
    hat1, hat2 = with_background(hat1), with_background(hat2)
    ecr = ohem_l1(max_onehot(hat2.detach()), hat_rv1, cfg.ecr_topk) + ohem_l1(max_onehot(hat1.detach()), hat_rv2, cfg.ecr_topk)
    cls_ = (mlsm1 + mlsm2) / 2
    amp = (amp1 + amp2) / 2
    loss = cls_ + cfg.amp_weight * amp + er + ecr
    return loss, {"cls": cls_.detach(), "amp": amp.detach(), "er": er.detach(), "ecr": ecr.detach()}
