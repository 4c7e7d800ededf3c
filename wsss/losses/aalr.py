"""AA&LR's losses (Zhang et al., ACM MM 2021; no official code: the design is ours, docs/methods/aalr.md).

- `cam_pseudo_labels`: the classification branch's CAMs -> pseudo masks (no gradient).
- `adaptive_affinity_loss`: local pair-wise affinity on the segmentation prediction, supervised by
  the pseudo mask's pair labels, each pair group averaged on its own (AffinityNet's balance).
- `label_reassign`: pixels whose decoder embedding sits clearly closer to another class's prototype
  than to their own label's are reassigned to that class; the LR loss pulls embeddings to the
  prototype of their (reassigned) label.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE = 255


@torch.no_grad()
def cam_pseudo_labels(cams: torch.Tensor, labels: torch.Tensor, size: Sequence[int], bg_threshold: float,
                      ignore_band: Sequence[float] = ()) -> torch.Tensor:
    """Raw foreground CAMs (N, K, h, w), labels (N, K) multi-hot -> pseudo masks (N, H, W) int64, 255 = ignore.

    Each present class's CAM is ReLU'd and max-normalised (absent classes are 0); background scores
    the constant `bg_threshold`; argmax over [bg, classes]. Pixels whose best foreground score lies in
    `ignore_band` = [low, high] are left unlabelled (uncertain).
    """
    cams = F.interpolate(F.relu(cams.float()), tuple(size), mode="bilinear", align_corners=False)
    cams = cams / (cams.flatten(2).amax(2)[..., None, None] + 1e-5) * (labels > 0.5).to(cams.dtype)[..., None, None]
    bg = torch.full_like(cams[:, :1], bg_threshold)
    target = torch.cat([bg, cams], 1).argmax(1)
    if len(ignore_band) == 2:
        top = cams.amax(1)
        target[(top >= ignore_band[0]) & (top < ignore_band[1])] = IGNORE
    return target


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """Half of the 8-neighbourhood (right, down, down-right, down-left) at each dilation: every pair once."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1))]


def _pair(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops (..., H - dy, W - |dx|) of x at p and at p + (dy, dx)."""
    h, w = x.shape[-2:]
    a = x[..., : h - dy, max(0, -dx) : w - max(0, dx)]
    b = x[..., dy:, max(0, dx) : w - max(0, -dx)]
    return a, b


def adaptive_affinity_loss(probs: torch.Tensor, target: torch.Tensor, dilations: Sequence[int] = (1, 2, 4),
                           eps: float = 1e-5) -> torch.Tensor:
    """probs (N, C, H, W) softmax, target (N, H, W) with 255 = ignore -> scalar.

    For pixel pairs (i, j) at the offsets, both labelled: predicted affinity a = sum_c p_i(c) p_j(c)
    (the probability that the two pixels get the same class). Same label: -log a; different labels:
    -log(1 - a). The three groups (same-label background pairs, same-label foreground pairs,
    different-label pairs) are averaged separately and weighted 1/4, 1/4, 1/2, so the rare boundary
    pairs count as much as the many pairs inside regions whatever an image's layout (an empty group adds 0).
    """
    sums = torch.zeros(3, device=probs.device, dtype=probs.dtype)
    counts = torch.zeros(3, device=probs.device, dtype=probs.dtype)
    for dy, dx in _offsets(dilations):
        if dy >= probs.shape[-2] or abs(dx) >= probs.shape[-1]:
            continue
        pa, pb = _pair(probs, dy, dx)
        ta, tb = _pair(target, dy, dx)
        aff = (pa * pb).sum(1).clamp(eps, 1 - eps)
        valid = (ta != IGNORE) & (tb != IGNORE)
        same = valid & (ta == tb)
        groups = (same & (ta == 0), same & (ta > 0), valid & (ta != tb))
        losses = (-aff.log(), -aff.log(), -(1 - aff).log())
        for g, (m, l) in enumerate(zip(groups, losses)):
            sums[g] = sums[g] + (l * m).sum()
            counts[g] = counts[g] + m.sum()
    means = sums / (counts + eps)
    return means[0] / 4 + means[1] / 4 + means[2] / 2


def label_reassign(features: torch.Tensor, target: torch.Tensor, num_classes: int, margin: float = 0.1,
                   temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder features (N, D, h, w), pseudo mask (N, H, W) over num_classes -> (reassigned mask (N, H, W), LR loss).

    At feature resolution (labels by nearest sampling): per image, the prototype of class c is the
    normalised mean embedding (no gradient) of the pixels labelled c. A labelled pixel is reassigned
    to the class whose prototype is most similar (cosine) when that similarity beats its own label's
    by more than `margin`. LR loss = cross entropy of the cosine similarities / temperature towards
    the (reassigned) label, over labelled pixels. The mask keeps full resolution: a pixel is changed
    when its feature cell is reassigned and it carries the label that cell had.
    """
    n, d, h, w = features.shape
    emb = F.normalize(features, dim=1)
    low = F.interpolate(target[:, None].float(), (h, w), mode="nearest")[:, 0].long()
    labelled = low != IGNORE
    onehot = F.one_hot(torch.where(labelled, low, torch.zeros_like(low)), num_classes).permute(0, 3, 1, 2).to(emb.dtype)
    onehot = onehot * labelled[:, None].to(emb.dtype)  # (N, C, h, w)
    present = onehot.flatten(2).sum(2) > 0  # (N, C)
    protos = F.normalize(torch.einsum("nkhw,ndhw->nkd", onehot, emb.detach()), dim=2)  # (N, C, D)
    sim = torch.einsum("nkd,ndhw->nkhw", protos, emb)  # (N, C, h, w) cosine similarities
    sim = sim.masked_fill(~present[..., None, None], float("-inf"))
    with torch.no_grad():
        best = sim.argmax(1)
        own = sim.gather(1, torch.where(labelled, low, torch.zeros_like(low))[:, None])[:, 0]
        change = labelled & (sim.amax(1) - own > margin)
        new_low = torch.where(change, best, low)
    if labelled.any():
        logits = (sim / temperature).permute(0, 2, 3, 1)[labelled]
        loss = F.cross_entropy(logits, new_low[labelled])
    else:
        loss = features.sum() * 0.0
    up = lambda t: F.interpolate(t[:, None].float(), target.shape[-2:], mode="nearest")[:, 0].long()  # noqa: E731
    changed, new_up, old_up = up(change.long()).bool(), up(new_low), up(low)
    reassigned = torch.where(changed & (target == old_up), new_up, target)
    return reassigned, loss
