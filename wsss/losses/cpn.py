"""CPN's training objective, as the official `train_cpn.py` computes it (triplet network).

Views: the crop x, x1 = x * m and x2 = x * (1 - m) (m: the complementary patch mask, applied to the
normalised images), kept = fraction of x that x1 keeps. With y' = [1, y] and max_norm as in SEAM,
network outputs upsampled to the input size (align_corners=True):
  c = max_norm(cam) y',  c1 = kept max_norm(cam1) y',  c2 = (1 - kept) max_norm(cam2) y'  (likewise r, r1, r2 for cam_rv)
  cls  = mean_v MLSM(GAP(cam_v)[fg], y) + amp_weight * mean_v AMP(cam_rv_v y')              (v over the 3 views)
  tcp  = mean |(c1 + c2).detach() - c|_fg + mean |r - r1 - r2|_fg                           (the pair's sum ~ the original)
  then every background channel := 1 - max foreground, and
  cpcr = OHEM_k(|max_onehot(c - c1).detach() - r2|) + OHEM_k(|max_onehot(c - c2).detach() - r1|)
  loss = cls + tcp_weight * tcp + cpcr_weight * cpcr
max_onehot here keeps, in every pixel, only the largest of *all* C channels (the code's
`tool/imutils.max_onehot`), unlike SEAM/PMM's foreground-only version. OHEM_k: mean of the top
`cpcr_topk` (20%) of the C*H*W entries of each sample. With pair=False only the original view is
used (cls on it alone): the baseline CAM row of the ablation.
"""

from __future__ import annotations

from typing import Any

import torch

from wsss.losses.seam import max_norm, ohem_l1, view_terms, with_background


def max_onehot_all(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> the same with every channel below the per-pixel maximum over all C channels zeroed."""
    return torch.where(x == x.amax(1, keepdim=True), x, torch.zeros_like(x))


def _view(net: Any, x: torch.Tensor, labels: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One view -> (max_norm(cam) y', max_norm(cam_rv) y', MLSM, AMP) at input size."""
    cam, cam_rv, mlsm, amp = view_terms(net, x, labels, y)
    return max_norm(cam) * y, max_norm(cam_rv) * y, mlsm, amp


def complementary_terms(c: torch.Tensor, r: torch.Tensor, c1: torch.Tensor, r1: torch.Tensor, c2: torch.Tensor,
                        r2: torch.Tensor, topk: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair terms from weighted, normalised maps (N, C, H, W), channel 0 background -> (tcp, cpcr)."""
    tcp = ((c1[:, 1:] + c2[:, 1:]).detach() - c[:, 1:]).abs().mean() + (r[:, 1:] - r1[:, 1:] - r2[:, 1:]).abs().mean()
    c, c1, c2, r1, r2 = (with_background(t) for t in (c, c1, c2, r1, r2))
    cpcr = ohem_l1(max_onehot_all((c - c1).detach()), r2, topk) + ohem_l1(max_onehot_all((c - c2).detach()), r1, topk)
    return tcp, cpcr


def cpn_loss(net: Any, x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor,
             options: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x (N, 3, H, W) normalised, labels (N, C-1), mask (N, H, W) (1 = kept in view 1), kept (N,) -> (loss, parts).

    options: pair, amp_weight, tcp_weight, cpcr_weight, cpcr_topk (CPNOptions).
    """
    n = x.shape[0]
    y = torch.cat([torch.ones(n, 1, device=x.device, dtype=x.dtype), labels.to(x.dtype)], 1)[..., None, None]
    c, r, mlsm, amp = _view(net, x, labels, y)
    if not options.pair:
        loss = mlsm + options.amp_weight * amp
        return loss, {"cls": mlsm.detach(), "amp": amp.detach()}
    m = mask.to(x.dtype).unsqueeze(1)
    k = kept.to(x.dtype).view(n, 1, 1, 1)
    c1, r1, mlsm1, amp1 = _view(net, x * m, labels, y)
    c2, r2, mlsm2, amp2 = _view(net, x * (1 - m), labels, y)
    cls_ = (mlsm + mlsm1 + mlsm2) / 3
    amp = (amp + amp1 + amp2) / 3
    tcp, cpcr = complementary_terms(c, r, k * c1, k * r1, (1 - k) * c2, (1 - k) * r2, options.cpcr_topk)
    loss = cls_ + options.amp_weight * amp + options.tcp_weight * tcp + options.cpcr_weight * cpcr
    return loss, {"cls": cls_.detach(), "amp": amp.detach(), "tcp": tcp.detach(), "cpcr": cpcr.detach()}
