"""Fully connected CRF mean-field inference (Krähenbühl & Koltun 2011), Potts model, as pydensecrf runs it.

Energy: unary U_i(l) plus, for each kernel m (Gaussian on xy, bilateral on xy + rgb), Potts pairs
w_m k_m(f_i, f_j) [l_i != l_j]. pydensecrf (densecrf 2) iterates

    Q <- softmax(-U);  repeat: Q <- softmax(-U + sum_m w_m K_m Q)

where K_m is the permutohedral filter with symmetric normalisation, K = D^-1/2 L D^-1/2 and
D = diag(L 1), including the self term; Potts enters as -w Q (the constant part cancels in the
softmax). We do the same with our lattice, which is built exactly like densecrf's, so labels agree
with pydensecrf up to float rounding (tests/test_crf_pydensecrf.py measures it).

Layouts: image (H, W, 3) uint8 (numpy array or tensor, pydensecrf's convention; a batch is
(B, H, W, 3)); probabilities / unaries (C, H, W) or (B, C, H, W). Everything runs on the device
of the probabilities (or unaries).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from wsss.crf.filters import spatial_lattice
from wsss.crf.lattice import LatticeSum, LatticeWeights, PermutohedralLattice
from wsss.crf.presets import CRFParams

ArrayLike = Union[Tensor, np.ndarray]

def unary_from_probs(probs: ArrayLike, clip: float = 1e-5, scale: Optional[float] = None) -> Tensor:
    """pydensecrf's unary_from_softmax: -log(clip(p, clip, 1)) for probs (C, ...) -> float32 (C, ...)."""
    p = torch.as_tensor(probs)
    p = p.double() if p.dtype == torch.float64 else p.float()
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError("scale must be in (0, 1]")
        p = scale * p + (1 - scale) / p.shape[0]
    if clip is not None:
        p = p.clamp(clip, 1.0)
    return (-torch.log(p)).float()


def unary_from_labels(labels: ArrayLike, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> Tensor:
    """pydensecrf's unary_from_labels (IRN's CRF input): labels (H, W) int -> energies (C, H, W) float32."""
    if not 0 < gt_prob < 1:
        raise ValueError("gt_prob must be in (0, 1)")
    lab = torch.as_tensor(labels).long()
    n_energy = -float(np.log((1.0 - gt_prob) / (n_labels - 1)))
    p_energy = -float(np.log(gt_prob))
    u = torch.full((n_labels,) + tuple(lab.shape), n_energy, dtype=torch.float32, device=lab.device)
    idx = (lab - 1) if zero_unsure else lab
    # With zero_unsure, label 0 maps to index -1, i.e. the last label, as numpy indexing does in
    # pydensecrf; those pixels are overwritten with the uniform energy right after.
    u.scatter_(0, (idx % n_labels)[None], p_energy)
    if zero_unsure:
        u[:, lab == 0] = -float(np.log(1.0 / n_labels))
    return u


def _image_tensor(image: ArrayLike, device: torch.device) -> Tensor:
    """(H, W, 3) or (B, H, W, 3) array/tensor -> float32 (B, H, W, 3) on device."""
    if isinstance(image, np.ndarray):
        # torch warns on read-only arrays (e.g. np.asarray of a PIL image); copy those.
        image = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)
    img = torch.as_tensor(image)
    if img.dim() == 3:
        img = img[None]
    if img.dim() != 4 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) or (B, H, W, 3), got {tuple(img.shape)}")
    return img.to(device=device, dtype=torch.float32)


class _Kernel:
    """One Potts kernel: a lattice plus weights with symmetric normalisation and compat folded in."""

    def __init__(self, lattice: PermutohedralLattice, compat: float, batch_in_channels: int) -> None:
        self.lattice = lattice
        self.compat = float(compat)
        self.fold = batch_in_channels  # >1: one grid lattice shared by B images, batch in channels
        key = ("potts_symmetric", self.compat)
        if key not in lattice.cache:  # cached lattices (the xy grid) keep their weights too
            s, _ = lattice.normalizer("symmetric")
            # densecrf: out = -compat * n * L(n * Q); the sign is absorbed by adding the message.
            w = lattice.weights(s, s, slice_factor=compat)
            k1 = lattice.apply(torch.ones(lattice.num_points, 1, device=lattice.device), w)[:, 0]
            lattice.cache[key] = (w, k1)
        self.weights: LatticeWeights = lattice.cache[key][0]
        self._k1_single: Tensor = lattice.cache[key][1]

    def message(self, q: Tensor) -> Tensor:
        """q (B*N, C) -> compat * K q (B*N, C)."""
        if self.fold == 1:
            return self.lattice.apply(q, self.weights)
        b = self.fold
        n = q.shape[0] // b
        c = q.shape[1]
        rows = q.view(b, n, c).permute(1, 0, 2).reshape(n, b * c)
        return self.lattice.apply(rows, self.weights).view(n, b, c).permute(1, 0, 2).reshape(b * n, c)

    def k1(self) -> Tensor:
        """compat * K 1 per point (B*N,)."""
        return self._k1_single if self.fold == 1 else self._k1_single.repeat(self.fold)


class DenseCRF:
    """Dense CRF kernels for one image (H, W, 3) or a batch (B, H, W, 3), built once; ``inference`` runs mean field."""

    def __init__(self, image: ArrayLike, params: CRFParams, device: Optional[Union[torch.device, str]] = None) -> None:
        if device is not None:
            dev = torch.device(device)
        else:
            dev = image.device if isinstance(image, Tensor) else torch.device("cpu")
        img = _image_tensor(image, dev)
        b, h, w, _ = img.shape
        self.params = params
        self.shape = (b, h, w)
        self.device = dev
        self.kernels: list[_Kernel] = []
        if params.gauss_compat != 0:
            # The xy kernel does not depend on the image: one cached grid lattice for all images.
            self.kernels.append(_Kernel(spatial_lattice(h, w, params.gauss_sxy, dev), params.gauss_compat, b))
        if params.bilateral_compat != 0:
            n = h * w
            xy = torch.stack(torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")[::-1], -1)
            xy = (xy / params.bilateral_sxy).reshape(1, n, 2).expand(b, n, 2)
            rgb = img.reshape(b, n, 3) / params.bilateral_srgb
            feats = torch.cat([xy, rgb], 2).reshape(b * n, 5)
            batch = torch.arange(b, device=dev).repeat_interleave(n) if b > 1 else None
            self.kernels.append(_Kernel(PermutohedralLattice(feats, batch), params.bilateral_compat, 1))
        # One image: run both kernels as one stacked lattice (one splat, blur and slice per step).
        self._merged = LatticeSum([(k.lattice, k.weights) for k in self.kernels]) \
            if len(self.kernels) > 1 and all(k.fold == 1 for k in self.kernels) else None

    def _message(self, q: Tensor) -> Tensor:
        """q (B*N, C) -> sum_k w_k K_k q (B*N, C)."""
        if self._merged is not None:
            return self._merged.apply(q)
        msg = self.kernels[0].message(q)
        for k in self.kernels[1:]:
            msg.add_(k.message(q))
        return msg

    def inference(self, unary: Tensor, iterations: Optional[int] = None) -> Tensor:
        """Unary energies (C, H, W) or (B, C, H, W) -> marginals Q of the same shape (float32)."""
        single = unary.dim() == 3
        u = unary[None] if single else unary
        b, c, h, w = u.shape
        if (b, h, w) != self.shape:
            raise ValueError(f"unary {tuple(unary.shape)} does not match the image {self.shape}")
        iters = self.params.iterations if iterations is None else int(iterations)
        u = u.to(device=self.device, dtype=torch.float32)
        if c == 2 and self.kernels:
            out = self._inference2(u, iters)
        else:
            out = self._inference_multi(u, iters)
        return out[0] if single else out

    def _inference_multi(self, u: Tensor, iters: int) -> Tensor:
        """Any number of labels: Q <- softmax(-U + sum_k w_k K_k Q), channel-last (B*N, C)."""
        b, c, h, w = u.shape
        neg_u = (-u).permute(0, 2, 3, 1).reshape(b * h * w, c)
        # Shift each pixel's logits by its largest -U once. The message is in [0, sum_k w_k K_k 1]
        # (non-negative kernel and Q, compat >= 0), so exp() below can neither overflow nor make
        # the top label vanish, and the softmax needs no per-iteration max (slow over a short last dim).
        neg_u = (neg_u - neg_u.amax(1, keepdim=True)).contiguous()
        q = _normalize_rows(neg_u.exp())
        if not self.kernels or iters <= 0:
            return q.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        safe = all(k.compat >= 0 for k in self.kernels) and float(sum(k.k1() for k in self.kernels).max()) < 60.0
        ones = torch.ones(c, 1, dtype=q.dtype, device=q.device)
        for _ in range(iters):
            msg = self._message(q).add_(neg_u)
            q = _normalize_rows(msg.exp_(), ones) if safe else torch.softmax(msg, 1)
        return q.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    def _inference2(self, u: Tensor, iters: int) -> Tensor:
        """Two labels: softmax is a sigmoid of the difference, and Q_0 = 1 - Q_1 needs no filtering.

        With m_l = sum_k w_k K_k Q_l and K Q_0 = K 1 - K Q_1, the update is
        Q_1 = sigmoid((u_0 - u_1) + 2 m_1 - sum_k w_k K_k 1): one channel through the lattices.
        """
        b, _, h, w = u.shape
        du = (u[:, 0] - u[:, 1]).reshape(b * h * w, 1)
        k1 = sum(k.k1() for k in self.kernels)[:, None]
        bias = du - k1
        q1 = torch.sigmoid(du)
        for _ in range(iters):
            q1 = torch.sigmoid(torch.add(bias, self._message(q1), alpha=2.0))
        q1 = q1.view(b, 1, h, w)
        return torch.cat([1.0 - q1, q1], 1)


def _normalize_rows(e: Tensor, ones: Optional[Tensor] = None) -> Tensor:
    """Divide each row of e (N, C) by its sum, in place; the row sums come from a mat-vec (fast)."""
    if ones is None:
        ones = torch.ones(e.shape[1], 1, dtype=e.dtype, device=e.device)
    return e.mul_((e @ ones).reciprocal_())


def _unaries(probs: ArrayLike, unary: str, clip: float) -> Tensor:
    t = torch.as_tensor(probs)
    if unary == "probs":
        return unary_from_probs(t, clip)
    if unary == "logits":
        return -t.float()
    if unary == "energy":
        return t.float()
    raise ValueError(f"unary must be 'probs', 'logits' or 'energy', got {unary!r}")


def dense_crf(image: ArrayLike, probs: ArrayLike, params: CRFParams, *, unary: str = "probs",
              clip: float = 1e-5, iterations: Optional[int] = None) -> Tensor:
    """Mean-field dense CRF: image (H, W, 3) uint8, probs (C, H, W) -> probabilities (C, H, W).

    unary: 'probs' (-log(clip(p)), pydensecrf's unary_from_softmax; p need not sum to 1),
    'logits' (energies -x) or 'energy' (already energies). Runs on the device of ``probs``.
    """
    u = _unaries(probs, unary, clip)
    if u.dim() != 3:
        raise ValueError(f"probs must be (C, H, W), got {tuple(u.shape)}")
    return DenseCRF(image, params, device=u.device).inference(u, iterations)


def dense_crf_batch(images: ArrayLike, probs: ArrayLike, params: CRFParams, *, unary: str = "probs",
                    clip: float = 1e-5, iterations: Optional[int] = None) -> Tensor:
    """Batched dense_crf: images (B, H, W, 3) uint8, probs (B, C, H, W) -> (B, C, H, W)."""
    u = _unaries(probs, unary, clip)
    if u.dim() != 4:
        raise ValueError(f"probs must be (B, C, H, W), got {tuple(u.shape)}")
    return DenseCRF(images, params, device=u.device).inference(u, iterations)
