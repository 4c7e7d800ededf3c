"""Exact dense Gaussian filter over all pairs, O(N^2): the reference the lattice is tested against."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from wsss.crf.lattice import NORMALIZATIONS


def gaussian_kernel_matrix(features: Tensor, batch_index: Optional[Tensor] = None) -> Tensor:
    """K_ij = exp(-|f_i - f_j|^2 / 2) for features (N, d) -> (N, N); zero across images of a batch."""
    f = features
    sq = (f * f).sum(1)
    # |a-b|^2 via the Gram matrix, clamped: rounding can make it slightly negative.
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (f @ f.T)).clamp_min(0.0)
    k = torch.exp(-0.5 * d2)
    if batch_index is not None:
        k = k * (batch_index[:, None] == batch_index[None, :]).to(k.dtype)
    return k


def exact_gaussian_filter(features: Tensor, values: Tensor, normalization: str = "none",
                          batch_index: Optional[Tensor] = None) -> Tensor:
    """sum_j exp(-|f_i - f_j|^2 / 2) v_j for features (N, d), values (N, C) -> (N, C) (tiny N only).

    normalization: 'none' (raw sum, self term included), 'symmetric' (D^-1/2 K D^-1/2 v with
    D = diag(K 1), as densecrf) or 'row' (K v / K 1, a weighted average).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    squeeze = values.dim() == 1
    v = values[:, None] if squeeze else values
    k = gaussian_kernel_matrix(features.to(v.dtype), batch_index)
    if normalization == "none":
        out = k @ v
    else:
        deg = k.sum(1)
        if normalization == "symmetric":
            s = deg.rsqrt()
            out = s[:, None] * (k @ (s[:, None] * v))
        else:
            out = (k @ v) / deg[:, None]
    return out[:, 0] if squeeze else out
