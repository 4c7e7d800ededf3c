"""Dynamic Feature Regularized (DFR) loss: our design from the abstract (Zhang, Xiao, Zhao, arXiv 2108.01296).

The paper has no public code; every choice below is ours and docs/methods/scribbles.md gives the reasons.

* Grid. The softmax, the image and the network's deep features are average-pooled onto a coarse grid
  (`size` cells along the longer side, 32 -> 1,024 cells), where a dense P x P kernel is cheap.
* Kernel. A Gaussian on joint shallow and deep features (the product of three Gaussians):
      W_ij = exp(-|p_i - p_j|^2 / 2 s_xy^2 - |c_i - c_j|^2 / 2 s_rgb^2 - |e_i - e_j|^2 / 2 s_deep^2),  i != j,
  p cell centres in input pixels, c mean cell colour (0..255), e the unit-length embedding of the
  feature consistency head. e is recomputed from the current network every step (dynamic) and
  detached in W, so the regularised loss cannot shrink itself by collapsing the embeddings.
* Regulariser. Potts relaxation normalised by the kernel mass, per image:
      R = sum_ij W_ij (1 - S_i . S_j) / sum_ij W_ij   in [0, 1]   (the kernel-weighted share of pairs that disagree).
* Consistency head. 1x1 conv - ReLU - 1x1 conv on the decoder features -> unit-length embeddings.
  Its pair-wise loss is a class-balanced binary cross-entropy between the affinity
  A_ij = exp(-|e_i - e_j|^2 / 2 s_deep^2) and "same label" for pairs of labelled cells; a cell's
  label is its scribble class, or the network's own prediction where that is confident. The
  predictions (improved by the regulariser) teach the head, the head's kernel regularises the
  predictions: the two are trained together, end to end, and the head's gradient reaches the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.errors import ConfigError


_EPS = 1e-6


@dataclass
class DFROptions:
    """`seg.loss.dfr`: a dense kernel on a coarse grid over joint shallow (xy, rgb) and deep
    (feature-consistency-head) features, plus the head's pair-wise loss (docs/methods/scribbles.md)."""

    weight: float = 1.0  # the deep-kernel Potts term, normalised to [0, 1] per image
    sigma_xy: float = 80.0  # input pixels
    sigma_rgb: float = 30.0
    sigma_deep: float = 0.5  # on unit-length embeddings (|e_i - e_j|^2 in [0, 4])
    size: int = 32  # grid cells along the longer side where the dense kernel is computed
    feature_dim: int = 32  # consistency-head embedding size
    head_channels: int = 64
    consistency_weight: float = 0.1
    confidence: float = 0.9  # predicted cells above this join the scribbles as pair labels for the head
    densecrf: bool = True  # also add the full-resolution DenseCRF loss of seg.loss.densecrf
    warmup_steps: int = 0  # the deep-kernel term starts after this many steps (the head trains from step 0)
    # confident predictions join the head's pair labels from this step on (before it: scribble cells only),
    # so that the early, background-biased predictions do not teach the head
    prediction_labels_from_step: int = 0

    def __post_init__(self) -> None:
        if self.prediction_labels_from_step < 0 or self.warmup_steps < 0:
            raise ConfigError("seg.loss.dfr: warmup_steps and prediction_labels_from_step are steps, >= 0, got "
                              f"{self.warmup_steps} and {self.prediction_labels_from_step}")


def grid_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(gh, gw) with `size` cells along the longer side (never more cells than pixels)."""
    s = size / max(height, width)
    return max(1, min(height, round(height * s))), max(1, min(width, round(width * s)))


def area_pool(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Cell averages (B, C, H, W) -> (B, C, gh, gw); avg_pool2d when the grid divides the map (much faster on CPU)."""
    h, w = x.shape[-2:]
    if h % grid[0] == 0 and w % grid[1] == 0:
        k = (h // grid[0], w // grid[1])
        return F.avg_pool2d(x, k, k)
    return F.adaptive_avg_pool2d(x, grid)


def pool_to_grid(x: Tensor, weight: Optional[Tensor], grid: tuple[int, int]) -> Tensor:
    """Weighted area average: x (B, C, H, W), weight (B, 1, H, W) or None -> (B, C, gh, gw) (0 where the weight is 0)."""
    if weight is None:
        return area_pool(x, grid)
    return area_pool(x * weight, grid) / area_pool(weight, grid).clamp_min(_EPS)


def features_to_grid(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """Decoder features (B, F, h, w) -> (B, F, gh, gw): cell averages, or bilinear samples when the grid does not
    divide the map (adaptive pooling's backward is slow on CPU; decoder features are smooth, so aliasing is small)."""
    h, w = features.shape[-2:]
    if h % grid[0] == 0 and w % grid[1] == 0:
        return area_pool(features, grid)
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def cell_centres(height: int, width: int, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """(x, y) of each cell centre in input pixels, row-major -> (gh * gw, 2)."""
    gh, gw = grid
    x = (torch.arange(gw, device=device, dtype=dtype) + 0.5) * (width / gw)
    y = (torch.arange(gh, device=device, dtype=dtype) + 0.5) * (height / gh)
    return torch.stack([x.expand(gh, gw), y[:, None].expand(gh, gw)], -1).reshape(-1, 2)


def sq_dists(f: Tensor) -> Tensor:
    """Pairwise squared distances of features (B, P, D) -> (B, P, P), clamped at 0."""
    sq = (f * f).sum(-1)
    return (sq[:, :, None] + sq[:, None, :] - 2.0 * f @ f.transpose(1, 2)).clamp_min(0.0)


def joint_kernel(xy: Tensor, rgb: Tensor, emb: Tensor, sigma_xy: float, sigma_rgb: float, sigma_deep: float,
                 valid: Optional[Tensor] = None) -> Tensor:
    """W_ij = exp(-d_xy/2s_xy^2 - d_rgb/2s_rgb^2 - d_e/2s_deep^2), zero diagonal and invalid rows/cols.

    xy (P, 2) or (B, P, 2), rgb (B, P, 3), emb (B, P, D), valid (B, P) bool -> (B, P, P).
    """
    if xy.dim() == 2:
        xy = xy.expand(rgb.shape[0], -1, -1)
    feats = torch.cat([xy / sigma_xy, rgb / sigma_rgb, emb / sigma_deep], -1)  # a Gaussian on joint features
    w = torch.exp(-0.5 * sq_dists(feats))
    w = w * (1.0 - torch.eye(w.shape[-1], dtype=w.dtype, device=w.device))  # self pairs carry no pair-wise information
    if valid is not None:
        v = valid.to(w.dtype)
        w = w * v[:, :, None] * v[:, None, :]
    return w


def potts_term(probs: Tensor, kernel: Tensor) -> Tensor:
    """Normalised Potts relaxation: probs (B, P, C), kernel (B, P, P) -> mean over images of
    sum_ij W_ij (1 - S_i.S_j) / sum_ij W_ij (images without kernel mass are skipped)."""
    mass = kernel.sum((1, 2))
    agree = (probs * (kernel @ probs)).sum((1, 2))  # sum_ij W_ij S_i.S_j
    has = mass > _EPS
    if not has.any():
        return probs.sum() * 0.0
    return (1.0 - agree[has] / mass[has]).mean()


def affinity(emb: Tensor, sigma_deep: float) -> Tensor:
    """A_ij = exp(-|e_i - e_j|^2 / 2 sigma^2) of embeddings (B, P, D) -> (B, P, P)."""
    return torch.exp(-0.5 * sq_dists(emb) / sigma_deep ** 2)


def consistency_loss(emb: Tensor, labels: Tensor, sigma_deep: float) -> tuple[Tensor, int]:
    """Class-balanced pair-wise BCE between affinities and "same label": emb (B, P, D), labels (B, P) with -1 = none.

    Returns (loss, number of labelled pairs). Positive pairs exclude i == j; -log A = |e_i - e_j|^2 / 2 sigma^2
    is used directly (exact and stable); negatives use -log(1 - A).
    """
    d2 = sq_dists(emb) / (2.0 * sigma_deep ** 2)
    lab = labels >= 0
    pair = lab[:, :, None] & lab[:, None, :]
    same = labels[:, :, None] == labels[:, None, :]
    eye = torch.eye(labels.shape[1], dtype=torch.bool, device=labels.device)
    pos = (pair & same & ~eye).to(d2.dtype)
    neg = (pair & ~same).to(d2.dtype)
    n_pos, n_neg = pos.sum(), neg.sum()
    # Masked sums rather than boolean indexing (no nonzero() over B x P x P on every step).
    loss_pos = (d2 * pos).sum() / n_pos.clamp_min(1.0)
    # -log(1 - exp(-x)), stable for small x through expm1; clamped where x = 0 (masked-out self pairs)
    loss_neg = (-torch.log((-torch.expm1(-d2)).clamp_min(_EPS)) * neg).sum() / n_neg.clamp_min(1.0)
    return loss_pos + loss_neg, int(n_pos + n_neg)


def scribble_cell_labels(target: Tensor, num_classes: int, grid: tuple[int, int]) -> Tensor:
    """Class of the scribble pixels in each cell if they agree, else -1: target (B, H, W) -> (B, gh * gw)."""
    b = target.shape[0]
    labels = torch.full((b, grid[0] * grid[1]), -1, dtype=torch.long, device=target.device)
    count = torch.zeros_like(labels)
    # Loop over the classes present (a handful per batch) rather than a (B, C, H, W) one-hot;
    # bincount instead of unique (no sort of every pixel).
    hist = torch.bincount(target.flatten().clamp(0, num_classes), minlength=num_classes + 1)[:num_classes]
    for k in hist.nonzero().flatten().tolist():
        present = F.adaptive_max_pool2d((target == k)[:, None].float(), grid).flatten(1) > 0
        labels[present] = k
        count += present.long()
    return torch.where(count == 1, labels, torch.full_like(labels, -1))


class ConsistencyHead(nn.Module):
    """Feature consistency head: 1x1 conv - ReLU - 1x1 conv, (B, C_in, h, w) -> unit embeddings (B, D, h, w)."""

    def __init__(self, in_channels: int, channels: int = 64, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


class DFRLoss(nn.Module):
    """The DFR terms on a coarse grid: weight x normalised Potts on the joint kernel + head consistency loss."""

    def __init__(self, in_channels: int, num_classes: int, weight: float = 1.0, sigma_xy: float = 80.0,
                 sigma_rgb: float = 30.0, sigma_deep: float = 0.5, size: int = 32, feature_dim: int = 32,
                 head_channels: int = 64, consistency_weight: float = 0.1, confidence: float = 0.9,
                 warmup_steps: int = 0, prediction_labels_from_step: int = 0):
        super().__init__()
        self.head = ConsistencyHead(in_channels, head_channels, feature_dim)
        self.num_classes = num_classes
        self.weight, self.sigma_xy, self.sigma_rgb, self.sigma_deep = weight, sigma_xy, sigma_rgb, sigma_deep
        self.size, self.consistency_weight, self.confidence, self.warmup_steps = size, consistency_weight, confidence, warmup_steps
        self.prediction_labels_from_step = prediction_labels_from_step

    def forward(self, probs: Tensor, features: Tensor, image: Tensor, target: Tensor, roi: Optional[Tensor],
                step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """softmax probs (B, C, H, W), decoder features (B, F, h, w), image (B, 3, H, W) 0..255, target (B, H, W),
        roi (B, H, W) bool -> (weighted loss, parts)."""
        b, c, h, w = probs.shape
        grid = grid_shape(h, w, self.size)
        dtype = probs.dtype
        if roi is None or bool(roi.all()):
            roi_f = None  # no padding: plain averages (most batches), no full-resolution masking
            valid = torch.ones(b, grid[0] * grid[1], dtype=torch.bool, device=probs.device)
        else:
            roi_f = roi[:, None].to(dtype)
            valid = area_pool(roi_f, grid).flatten(1) > 0.5  # cells with at least half real (non-padding) pixels
        probs = pool_to_grid(probs, roi_f, grid).flatten(2).transpose(1, 2)  # (B, P, C)
        with torch.no_grad():
            rgb = pool_to_grid(image.to(dtype), roi_f, grid).flatten(2).transpose(1, 2)  # (B, P, 3)
        feats = features_to_grid(features.to(dtype), grid)  # the head runs on the grid: cheap
        emb = self.head(feats).flatten(2).transpose(1, 2)  # (B, P, D), unit length

        # Head: pairs of labelled cells (scribbles first, then confident predictions once they may join).
        labels = scribble_cell_labels(target, c, grid)
        if step >= self.prediction_labels_from_step:
            conf, pred = probs.detach().max(-1)
            labels = torch.where((labels < 0) & (conf > self.confidence), pred, labels)
        labels = torch.where(valid, labels, torch.full_like(labels, -1))
        cons, n_pairs = consistency_loss(emb, labels, self.sigma_deep)
        parts = {"dfr_consistency": cons.detach(), "dfr_labelled_cells": (labels >= 0).float().mean()}
        loss = self.consistency_weight * cons

        if step >= self.warmup_steps and self.weight > 0:
            xy = cell_centres(h, w, grid, probs.device, dtype)
            with torch.no_grad():  # the kernel is a constant of the regulariser (see the module docstring)
                kernel = joint_kernel(xy, rgb, emb.detach(), self.sigma_xy, self.sigma_rgb, self.sigma_deep, valid)
            reg = potts_term(probs, kernel)
            parts["dfr_potts"] = reg.detach()
            loss = loss + self.weight * reg
        return loss, parts
