"""Permutohedral lattice (Adams, Baek, Davis 2010) in PyTorch: Gaussian filtering in any feature dimension.

A lattice is built once from per-point features ``(N, d)`` (already divided by their bandwidths) and
then filters values ``(N, C)`` with ``out_i ~= sum_j exp(-|f_i - f_j|^2 / 2) v_j`` in three linear steps:

* splat: each point spreads its value onto the d+1 vertices of its enclosing simplex with
  barycentric weights;
* blur: a [1/2, 1, 1/2] kernel (twice the normalised [1 2 1]/4 one) along each of the d+1 lattice
  directions, in a fixed order;
* slice: each point reads back the barycentric interpolation of its vertices, times
  alpha = 1 / (1 + 2^-d).

The construction (scale of the embedding, rounding to the nearest remainder-0 point, ranks, vertex
keys, neighbour keys, blur weights and alpha) follows the densecrf code that pydensecrf wraps and that
rloss and CRF-as-RNN also use, so ``normalization="none"`` reproduces their raw lattice output (about
0.5x the exact Gaussian sum) and the CRF built on it reproduces pydensecrf's marginals to ~1e-4.

Every step is a tensor op, no Python loop runs over points (loops run over the d dimensions):
vertex keys are packed linearly into one integer (exact mixed radix; a 64-bit hash with a collision
check when the range is too wide), runs of equal keys along the point order are collapsed, and one
stable sort of the run heads deduplicates them (a sorted-array "hash table"); blur neighbours are
found with one ``searchsorted``. Vertices are numbered in order of first use, as densecrf's hash
table does, which keeps the gathers cache friendly. Filtering is: splat = ``index_add_`` (one
channel) or an ``embedding_bag`` sum over each vertex's points; blur = per direction two
``index_select`` (one channel) or one ``embedding_bag`` of 3-entry bags; slice = one
``embedding_bag`` of (d+1)-entry bags with barycentric weights.

A batch of images is one lattice whose keys carry the image index, so no vertex is shared between
images and one call filters the whole batch.

The operator is linear. The blur along one direction is symmetric, but the directions do not commute
on a sparse lattice, so the exact adjoint runs the blur directions in reverse order: the backward pass
is the same filter with reversed blur order and the splat/slice scalings swapped (for the symmetric
normalisation they are equal). The features get no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZATIONS = ("none", "symmetric", "row")

# Largest packed key range for the exact mixed-radix packing (keeps int64 products safe).
_PACK_LIMIT = 1 << 62
# Up to this d, ranks come from d(d+1)/2 vectorised comparisons; above it, from a sort per point.
_PAIRWISE_RANK_MAX_D = 16


@dataclass
class LatticeWeights:
    """Splat and slice weights (N, d+1) of one filter (barycentric weights times the scalings)."""

    splat: Tensor
    slice: Tensor
    splat_csr: Optional[Tensor] = None  # splat weights in the lattice's vertex-major order, cached


class PermutohedralLattice:
    """Permutohedral lattice built from features (N, d); ``filter`` maps values (N, C) -> (N, C)."""

    def __init__(self, features: Tensor, batch_index: Optional[Tensor] = None) -> None:
        """features (N, d) float (already divided by the bandwidths); batch_index (N,) int or None."""
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be (N, d) with N, d > 0, got {tuple(features.shape)}")
        if not features.is_floating_point():
            features = features.float()
        n, d = features.shape
        dev = features.device
        self.num_points = n
        self.dim = d
        self.device = dev
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        if batch_index is not None:
            batch_index = batch_index.to(device=dev, dtype=torch.long).reshape(-1)
            if batch_index.numel() != n:
                raise ValueError("batch_index must have one entry per feature row")

        bary, q, rank = _embed(features.detach())  # (N, d+1), (d, N) int64, (d+1, N) int32
        dp1 = d + 1
        packer = _KeyPacker(q, batch_index, d)
        packed = packer.pack_simplex(q, rank, batch_index)  # (d+1, N) key of corner r of each simplex

        # Consecutive points mostly share simplex corners: keep only the first pair of each run of
        # equal keys along the point order (cheap), and sort only those run heads.
        head = torch.ones(dp1, n, dtype=torch.bool, device=dev)
        if n > 1:
            head[:, 1:] = packed[:, 1:] != packed[:, :-1]
        head = head.reshape(-1)
        heads_at = head.nonzero().squeeze(1)  # (K,) remainder-major pair positions r * N + n
        run_id = torch.cumsum(head, 0) - 1  # ((d+1) N,) run (head number) of each pair
        del head
        # A stable sort groups heads by key with each group's earliest pair first (int32 keys sort
        # faster; they fit for typical image features).
        key_dtype = torch.int32 if packer.fits_int32 else torch.long
        skeys, perm = torch.sort(packed.reshape(-1)[heads_at].to(key_dtype), stable=True)
        del packed
        k_heads = skeys.numel()
        new_group = torch.ones(k_heads, dtype=torch.bool, device=dev)
        new_group[1:] = skeys[1:] != skeys[:-1]
        gstart = new_group.nonzero().squeeze(1)  # (M,) start of each vertex's heads in sorted order
        uniq = skeys[gstart]  # (M,) sorted vertex keys
        gid = torch.cumsum(new_group, 0) - 1  # sorted vertex id of each sorted head
        del skeys, new_group
        m = uniq.numel()
        self.num_vertices = m
        first_pos = heads_at[perm[gstart]]
        first_n = first_pos % n
        v_rem = first_pos // n  # remainder r of each vertex
        # Number vertices in order of first use in point order (as densecrf's hash table does):
        # consecutive points then touch nearby vertex rows, which keeps the gathers cache friendly.
        vperm = torch.argsort(first_n * dp1 + v_rem)  # new id -> sorted id
        new_of_sorted = torch.empty(m, dtype=torch.long, device=dev)
        new_of_sorted[vperm] = torch.arange(m, device=dev)
        vid_head = torch.empty(k_heads, dtype=torch.long, device=dev)
        vid_head[perm] = new_of_sorted[gid]
        vid_pair = vid_head[run_id]  # ((d+1) N,) remainder-major
        del vid_head
        offsets = vid_pair.view(dp1, n).t().contiguous()  # (N, d+1)

        if packer.hashed:
            # Hashed keys could collide (never seen, but cheap to rule out): each pair's full key
            # must equal the key of its vertex's first pair.
            rows = _key_rows(q, rank, batch_index)  # (N, d+1, d+2)
            rep_sorted = rows.reshape(-1, d + 2)[first_n * dp1 + v_rem]
            if not torch.equal(rows, rep_sorted[vperm][offsets]):
                raise RuntimeError("permutohedral lattice: 64-bit key hash collision; rescale the features")
            del rows

        del perm, gid, vid_pair, run_id

        # Blur neighbours along direction j (Adams et al. 2010): key - (1,...,1) + (d+1) e_j, i.e.
        # (q - [r == 0] + e_j, r - 1 mod d+1) in (q, r) form; the other neighbour, key + (1,...,1)
        # - (d+1) e_j, is the inverse map. All d+1 directions in one searchsorted.
        is0 = (v_rem == 0).long()
        r_prev = torch.where(is0.bool(), torch.full_like(v_rem, d), v_rem - 1)
        base_n1 = uniq - is0 * sum(packer.coef) + packer.coef_r * (r_prev - v_rem)
        coef_j = torch.tensor(packer.coef + [0], dtype=torch.long, device=dev)
        query = (base_n1[None, :] + coef_j[:, None]).to(key_dtype)  # (d+1, M)
        if packer.hashed:
            idx = torch.searchsorted(uniq, query.reshape(-1)).clamp_(max=m - 1).view(dp1, m)
        else:
            # Vertices of remainder r are a contiguous block of the sorted keys, and their n1
            # neighbours all have remainder r-1: search each block's queries (sorted) in one block.
            starts_r = (torch.arange(dp1 + 1, device=dev) * packer.coef_r).to(uniq.dtype)
            bounds = torch.searchsorted(uniq, starts_r).tolist()
            idx = torch.empty(dp1, m, dtype=torch.long, device=dev)
            for r in range(dp1):  # d+1 remainders
                lo, hi = bounds[r], bounds[r + 1]
                tlo, thi = bounds[(r - 1) % dp1], bounds[(r - 1) % dp1 + 1]
                if hi > lo:
                    found_at = torch.searchsorted(uniq[tlo:thi], query[:, lo:hi].contiguous()) + tlo
                    idx[:, lo:hi] = found_at.clamp_(max=max(thi - 1, 0))
        found = (uniq[idx] == query).reshape(-1)
        idx = idx.reshape(-1)
        del query, base_n1
        if packer.hashed:
            rows = _key_rows(q, rank, batch_index).reshape(-1, d + 2)[first_n * dp1 + v_rem]  # sorted ids
            want = rows[None].repeat(dp1, 1, 1)
            want[:, :, :d] -= is0[None, :, None]
            want[torch.arange(d, device=dev), :, torch.arange(d, device=dev)] += 1
            want[:, :, d] = r_prev
            found &= (rows[idx] == want.reshape(-1, d + 2)).all(1)
            del rows, want
        idx = idx.view(dp1, m).index_select(1, vperm)
        found = found.view(dp1, m).index_select(1, vperm)
        self_idx = torch.arange(m, device=dev)
        n1 = torch.where(found, new_of_sorted[idx], self_idx)  # (d+1, M), new ids
        lin = (n1 + m * torch.arange(dp1, device=dev)[:, None])[found]  # where n2 is defined
        n2 = self_idx.repeat(dp1)
        n2[lin] = self_idx.expand(dp1, m)[found]
        w2 = torch.zeros(dp1 * m, dtype=torch.float32, device=dev)
        w2[lin] = 0.5
        # A missing neighbour reads the vertex itself with weight 0 (densecrf reads a zero slot).
        w1 = 0.5 * found.float()
        del idx, found, lin

        # int32 indices: embedding_bag accepts them and they halve the index traffic.
        idx_dtype = torch.int32 if n * dp1 < 2**31 else torch.long
        self.offsets = offsets.to(idx_dtype)  # (N, d+1) vertex of each simplex corner
        self.barycentric = bary  # (N, d+1)
        self._idx_dtype = idx_dtype
        self._csr: Optional[tuple[Tensor, Tensor, Tensor]] = None  # built on first multi-channel splat
        # Blur neighbours (d+1, M) in new ids and their weights (0.5, or 0 where missing).
        self._blur_n = (n1.to(idx_dtype), n2.view(dp1, m).to(idx_dtype))
        self._blur_w = (w1, w2.view(dp1, m))
        self._blur_bags: Optional[tuple[Tensor, Tensor]] = None  # (d+1, M, 3) bags, for multi-channel
        self._norm_cache: dict[tuple[str, torch.dtype], tuple[Optional[Tensor], Optional[Tensor]]] = {}
        self.cache: dict = {}  # derived quantities callers keep with the lattice (e.g. CRF weights)

    # ----------------------------------------------------------------------------------------------
    def weights(self, in_scale: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                dtype: torch.dtype = torch.float32, slice_factor: float = 1.0) -> LatticeWeights:
        """Per-point input/output scalings (N,) folded into splat and slice weights (alpha included)."""
        bary = self.barycentric.to(dtype)
        splat = bary if in_scale is None else bary * in_scale.to(dtype)[:, None]
        sl = bary * (self.alpha * slice_factor)
        if out_scale is not None:
            sl = sl * out_scale.to(dtype)[:, None]
        return LatticeWeights(splat=splat.contiguous(), slice=sl.contiguous())

    def _splat(self, values: Tensor, weights: LatticeWeights) -> Tensor:
        """Values (N, C) -> lattice values (M, C): each vertex sums its points' weighted values."""
        if values.shape[1] == 1:
            # One channel: a scatter-add is cheap and needs no grouping by vertex.
            src = (values * weights.splat).reshape(-1)
            out = torch.zeros(self.num_vertices, dtype=values.dtype, device=values.device)
            return out.index_add_(0, self.offsets.reshape(-1), src)[:, None]
        points, starts, order = self.csr()
        if weights.splat_csr is None:
            weights.splat_csr = weights.splat.reshape(-1)[order]
        return F.embedding_bag(points, values, starts, mode="sum", per_sample_weights=weights.splat_csr)

    def csr(self) -> tuple[Tensor, Tensor, Tensor]:
        """(point of each pair grouped by vertex, start of each vertex's pairs (M,), pair order), built once."""
        if self._csr is None:
            # Points grouped by vertex, so the splat is one embedding_bag sum per vertex.
            flat = self.offsets.reshape(-1)
            order = torch.sort(flat, stable=True).indices
            counts = torch.bincount(flat, minlength=self.num_vertices)
            starts = _exclusive_cumsum(counts).to(self._idx_dtype)
            self._csr = ((order // (self.dim + 1)).to(self._idx_dtype), starts, order)
        return self._csr

    def apply(self, values: Tensor, weights: LatticeWeights, reverse: bool = False) -> Tensor:
        """Splat-blur-slice of values (N, C) with prepared weights -> (N, C); no autograd graph."""
        if values.shape[0] != self.num_points:
            raise ValueError(f"values have {values.shape[0]} rows, the lattice has {self.num_points} points")
        values = values.contiguous()
        dtype = values.dtype
        lat = self._splat(values, weights)
        dirs = range(self.dim, -1, -1) if reverse else range(self.dim + 1)
        if lat.shape[1] == 1:
            v = lat[:, 0]
            for j in dirs:
                w1, w2 = self._blur_w[0][j].to(dtype), self._blur_w[1][j].to(dtype)
                v1 = v.index_select(0, self._blur_n[0][j])
                v = torch.addcmul(torch.addcmul(v, w1, v1), w2, v.index_select(0, self._blur_n[1][j]))
            lat = v[:, None]
        else:
            if self._blur_bags is None:
                # Each output vertex is one bag [self, n1, n2] with weights [1, w1, w2].
                m = self.num_vertices
                selfs = torch.arange(m, dtype=self._idx_dtype, device=self.device).expand(self.dim + 1, m)
                idx = torch.stack([selfs, self._blur_n[0], self._blur_n[1]], 2).contiguous()
                w = torch.stack([torch.ones_like(self._blur_w[0]), self._blur_w[0], self._blur_w[1]], 2).contiguous()
                self._blur_bags = (idx, w)
            bags, bag_w = self._blur_bags
            for j in dirs:
                lat = F.embedding_bag(bags[j], lat, mode="sum", per_sample_weights=bag_w[j].to(dtype))
        return F.embedding_bag(self.offsets, lat, mode="sum", per_sample_weights=weights.slice)

    def normalizer(self, normalization: str,
                   dtype: torch.dtype = torch.float32) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(in_scale, out_scale), each (N,) or None, for 'none' | 'symmetric' | 'row' normalisation."""
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        key = (normalization, dtype)
        if key not in self._norm_cache:
            if normalization == "none":
                scales: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)
            else:
                ones = torch.ones(self.num_points, 1, dtype=dtype, device=self.device)
                k1 = self.apply(ones, self.weights(dtype=dtype))[:, 0]
                # The 1e-20 guard is densecrf's; k1 >= alpha * (self weight) > 0 anyway.
                if normalization == "symmetric":
                    s = 1.0 / torch.sqrt(k1 + 1e-20)
                    scales = (s, s)
                else:
                    scales = (None, 1.0 / (k1 + 1e-20))
            self._norm_cache[key] = scales
        return self._norm_cache[key]

    def filter(self, values: Tensor, normalization: str = "none") -> Tensor:
        """Gaussian-filter values (N, C) -> (N, C), differentiable w.r.t. values."""
        squeeze = values.dim() == 1
        v = values[:, None] if squeeze else values
        in_s, out_s = self.normalizer(normalization, v.dtype)
        out = LatticeFilterFunction.apply(v, self, in_s, out_s)
        return out[:, 0] if squeeze else out


class LatticeFilterFunction(torch.autograd.Function):
    """out = diag(out_scale) L diag(in_scale) v; backward is the exact adjoint (reversed blur order)."""

    @staticmethod
    def forward(ctx, values: Tensor, lattice: PermutohedralLattice, in_scale: Optional[Tensor],
                out_scale: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        ctx.lattice = lattice
        ctx.scales = (in_scale, out_scale)
        return lattice.apply(values, lattice.weights(in_scale, out_scale, values.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        lattice: PermutohedralLattice = ctx.lattice
        in_scale, out_scale = ctx.scales
        g = None
        if ctx.needs_input_grad[0]:
            g = lattice.apply(grad, lattice.weights(out_scale, in_scale, grad.dtype), reverse=True)
        return g, None, None, None


class LatticeSum:
    """Sum of several lattice filters over the same points, run as one lattice (block diagonal).

    The CRF applies its Gaussian and bilateral kernels to the same Q every iteration; stacking the
    two lattices' vertices lets one splat, one blur pass per direction and one slice serve both
    (fewer, larger gathers, and no separate sum).
    """

    def __init__(self, parts: list[tuple[PermutohedralLattice, LatticeWeights]]) -> None:
        """parts: (lattice, prepared weights) pairs, all over the same N points."""
        n = parts[0][0].num_points
        if any(lat.num_points != n for lat, _ in parts):
            raise ValueError("all lattices of a LatticeSum must have the same points")
        dev = parts[0][0].device
        idx_dtype = torch.int32 if all(lat._idx_dtype == torch.int32 for lat, _ in parts) else torch.long
        self.num_points = n
        self.num_vertices = sum(lat.num_vertices for lat, _ in parts)
        self.directions = max(lat.dim + 1 for lat, _ in parts)
        bases = []
        base = 0
        for lat, _ in parts:
            bases.append(base)
            base += lat.num_vertices

        def shifted(t: Tensor, b: int) -> Tensor:
            t = t.to(idx_dtype)
            return t if b == 0 else t + b  # the first part (the cached xy lattice in the CRF) is not copied

        self.offsets = torch.cat([shifted(lat.offsets, b) for (lat, _), b in zip(parts, bases)], 1)  # (N, sum(d_k+1))
        self.splat = torch.cat([w.splat for _, w in parts], 1)
        self.slice = torch.cat([w.slice for _, w in parts], 1)
        n1, n2, w1, w2 = [], [], [], []
        for j in range(self.directions):
            row = [[], [], [], []]
            for (lat, _), b in zip(parts, bases):
                if j <= lat.dim:
                    row[0].append(shifted(lat._blur_n[0][j], b))
                    row[1].append(shifted(lat._blur_n[1][j], b))
                    row[2].append(lat._blur_w[0][j])
                    row[3].append(lat._blur_w[1][j])
                else:  # this lattice has fewer directions: identity (weight 0 on itself)
                    own = torch.arange(b, b + lat.num_vertices, dtype=idx_dtype, device=dev)
                    row[0].append(own)
                    row[1].append(own)
                    row[2].append(torch.zeros(lat.num_vertices, device=dev))
                    row[3].append(torch.zeros(lat.num_vertices, device=dev))
            for out, parts_j in zip((n1, n2, w1, w2), row):
                out.append(torch.cat(parts_j))
        self.blur_n = (torch.stack(n1), torch.stack(n2))  # (D, M_total)
        self.blur_w = (torch.stack(w1), torch.stack(w2))
        self._idx_dtype = idx_dtype
        self._parts = parts
        self._csr: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self._bags: Optional[tuple[Tensor, Tensor]] = None

    def _build_multi(self, device: torch.device) -> None:
        """CSR splat and 3-entry blur bags for multi-channel values, from the parts' own CSRs."""
        pts, starts, ws = [], [], []
        pair_base, vertex_base = 0, 0
        for lat, w in self._parts:
            p, st, order = lat.csr()  # cached on the lattice (the xy grid lattice is shared)
            if w.splat_csr is None:
                w.splat_csr = w.splat.reshape(-1)[order]
            pts.append(p.to(self._idx_dtype))
            starts.append(st.to(torch.long) + pair_base)
            ws.append(w.splat_csr)
            pair_base += p.numel()
            vertex_base += lat.num_vertices
        self._csr = (torch.cat(pts), torch.cat(starts).to(self._idx_dtype), torch.cat(ws))
        selfs = torch.arange(self.num_vertices, dtype=self._idx_dtype, device=device).expand(self.directions, -1)
        bags = torch.stack([selfs, self.blur_n[0], self.blur_n[1]], 2).contiguous()
        bag_w = torch.stack([torch.ones_like(self.blur_w[0]), self.blur_w[0], self.blur_w[1]], 2).contiguous()
        self._bags = (bags, bag_w)

    def apply(self, values: Tensor) -> Tensor:
        """values (N, C) -> sum_k L_k values (N, C), with each part's weights; no autograd graph."""
        values = values.contiguous()
        c = values.shape[1]
        if c == 1:
            src = (values * self.splat).reshape(-1)
            v = torch.zeros(self.num_vertices, dtype=values.dtype, device=values.device)
            v.index_add_(0, self.offsets.reshape(-1), src)
            for j in range(self.directions):
                v1 = v.index_select(0, self.blur_n[0][j])
                v2 = v.index_select(0, self.blur_n[1][j])
                v = torch.addcmul(torch.addcmul(v, self.blur_w[0][j], v1), self.blur_w[1][j], v2)
            lat = v[:, None]
        else:
            if self._csr is None:
                self._build_multi(values.device)
            pts, starts, sw = self._csr
            bags, bag_w = self._bags  # type: ignore[misc]
            lat = F.embedding_bag(pts, values, starts, mode="sum", per_sample_weights=sw)
            for j in range(self.directions):
                lat = F.embedding_bag(bags[j], lat, mode="sum", per_sample_weights=bag_w[j])
        return F.embedding_bag(self.offsets, lat, mode="sum", per_sample_weights=self.slice)


def lattice_filter(features: Tensor, values: Tensor, normalization: str = "none",
                   batch_index: Optional[Tensor] = None) -> Tensor:
    """One-shot lattice Gaussian filter: features (N, d), values (N, C) -> (N, C)."""
    return PermutohedralLattice(features, batch_index).filter(values, normalization)


# --------------------------------------------------------------------------------------------------
def _embed(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Features (N, d) -> barycentric weights (N, d+1), remainder-0 point q (d, N), ranks (d+1, N).

    Works on feature columns (loops run over the d dimensions, never over points) and in densecrf's
    order of float operations, so simplices and weights match pydensecrf's to float rounding.
    """
    n, d = features.shape
    dp1 = d + 1
    dtype = features.dtype
    ft = features.t().contiguous()  # (d, N): each column op below is contiguous
    # Elevate onto the hyperplane sum(x) = 0 of R^{d+1} with densecrf's scaling, which makes the
    # [1 2 1] blur approximate a unit-variance Gaussian in feature space (Adams et al. 2010, p.6).
    inv_std = math.sqrt(2.0 / 3.0) * dp1
    elevated = torch.empty(dp1, n, dtype=dtype, device=features.device)
    sm = torch.zeros(n, dtype=dtype, device=features.device)
    for j in range(d, 0, -1):
        cf = ft[j - 1] * (inv_std / math.sqrt(j * (j + 1)))
        elevated[j] = sm - j * cf
        sm = sm + cf
    elevated[0] = sm

    # Nearest remainder-0 lattice point (all coordinates multiples of d+1); ties to even, as the
    # SSE rounding of densecrf.
    down = torch.round(elevated * (1.0 / dp1))
    rem0 = down * dp1
    total = down.sum(0).to(torch.int32)  # how far the rounded point is off the hyperplane
    diff = elevated - rem0
    # rank[i] = position of coordinate i when sorting diff in decreasing order, ties by index.
    if d <= _PAIRWISE_RANK_MAX_D:
        rank = torch.zeros(dp1, n, dtype=torch.int32, device=features.device)
        for i in range(d):
            for j in range(i + 1, dp1):
                c = (diff[i] < diff[j]).to(torch.int32)
                rank[i] += c
                rank[j] += 1 - c
    else:
        perm = torch.argsort(-diff, dim=0, stable=True)
        positions = torch.arange(dp1, device=features.device)[:, None].expand(dp1, n).contiguous()
        rank = torch.empty_like(perm).scatter_(0, perm, positions)
        rank = rank.to(torch.int32)
    # Bring the point back onto the hyperplane: ranks wrap into 0..d and rem0 moves by the same
    # multiple of d+1 (densecrf's "if rank < 0: rank += d+1, rem0 += d+1", and the mirror case).
    shifted = rank + total
    rank = torch.remainder(shifted, dp1)
    rem0 += (rank - shifted).to(dtype)

    # Barycentric coordinates (Adams et al. 2010, p.10): with s_k the offset of the coordinate of
    # rank k, b[j] = s_{d-j} - s_{d-j+1} and b[0] = 1 + s_d - s_0 (densecrf's scatter, rewritten).
    v = (elevated - rem0) * (1.0 / dp1)
    s_by_rank = torch.empty_like(v).scatter_(0, rank.long(), v).flip(0)  # row j: s_{d-j}
    b = torch.empty_like(v)
    b[1:] = s_by_rank[1:] - s_by_rank[:-1]
    b[0] = 1.0 + s_by_rank[0] - s_by_rank[d]
    q = torch.round(rem0[:d] * (1.0 / dp1)).long()  # (d, N)
    return b.t().contiguous(), q, rank


class _KeyPacker:
    """Linear packing of vertex keys (batch, q (d,), r) into one int64: exact mixed radix, else a hash.

    Exact: c_i = prod_{k>i} R_k, batch coefficient c_0 R_0, c_r = c_0 R_0 B, with R_i the range of q_i
    padded by 2 below and 1 above (key q is q_point - {0, 1}; neighbours differ by 1 more), so
    neighbour keys pack without aliasing. When that range does not fit in 62 bits (large d) the
    coefficients are random 64-bit integers (wrapping arithmetic); collisions are then checked.
    """

    def __init__(self, q: Tensor, b: Optional[Tensor], d: int) -> None:
        """q (d, N) remainder-0 points, b (N,) batch index or None."""
        self.lo = (q.amin(1) - 2).tolist()
        radix = [hi + 1 - lo + 1 for hi, lo in zip(q.amax(1).tolist(), self.lo)]
        nb = 1 if b is None else int(b.max().item()) + 1
        coef = [0] * d
        c = 1
        for i in range(d - 1, -1, -1):
            coef[i] = c
            c *= int(radix[i])
        total = c * nb * (d + 1)
        self.hashed = total >= _PACK_LIMIT
        self.fits_int32 = total < 2**31 - 1
        if self.hashed:
            g = torch.Generator().manual_seed(0)
            rnd = torch.randint(-(2**62), 2**62, (d + 2,), generator=g) | 1
            coef = rnd[:d].tolist()
            self.coef_r = int(rnd[d])
            self.coef_b = int(rnd[d + 1])
        else:
            # r is the most significant digit: sorted keys come in d+1 blocks, one per remainder,
            # and a neighbour search only looks in one block.
            self.coef_b = c
            self.coef_r = c * nb
        self.coef: list[int] = [int(v) for v in coef]

    def pack_simplex(self, q: Tensor, rank: Tensor, b: Optional[Tensor]) -> Tensor:
        """Keys of the d+1 simplex corners: q (d, N), rank (d+1, N), b (N,) or None -> (d+1, N) int64.

        Corner r of a simplex is rem0 + canonical[r, rank]: coordinate i drops by d+1 when
        rank_i > d - r, so with the linear packing
            key(n, r) = key(q_n, 0) - sum_{i: rank_ni >= d - r + 1} c_i + c_r r,
        a cumulative sum over coefficients ordered by rank.
        """
        d, n = q.shape
        base = self.pack_q(q, b)
        coef = torch.tensor(self.coef + [0], dtype=torch.long, device=q.device)  # coordinate d: not stored
        by_rank = torch.empty(d + 1, n, dtype=torch.long, device=q.device)
        by_rank.scatter_(0, rank.long(), coef[:, None].expand(d + 1, n))
        out = torch.empty(d + 1, n, dtype=torch.long, device=q.device)
        out[0] = base
        key = base
        for r in range(1, d + 1):  # a running sum over the d+1 rows (faster than cumsum over dim 0)
            key = key - by_rank[d - r + 1] + self.coef_r
            out[r] = key
        return out

    def pack_q(self, q: Tensor, b: Optional[Tensor]) -> Tensor:
        """Packed key of (q (d, K), r = 0, b (K,) or None) -> (K,) int64."""
        key = torch.zeros(q.shape[1], dtype=torch.long, device=q.device) if b is None else b * self.coef_b
        for i, c in enumerate(self.coef):
            key = key + (q[i] - self.lo[i]) * c
        return key


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """[0, x0, x0 + x1, ...] without the total: (K,) -> (K,)."""
    out = torch.zeros_like(x)
    if x.numel() > 1:
        torch.cumsum(x[:-1], 0, out=out[1:])
    return out


def _key_rows(q: Tensor, rank: Tensor, b: Optional[Tensor]) -> Tensor:
    """Full vertex keys (N, d+1, d+2): q of every simplex corner, its remainder r and the batch index."""
    d, n = q.shape
    q = q.t()
    rank = rank.t()
    r = torch.arange(d + 1, device=q.device)
    kq = q[:, None, :] - (rank[:, None, :d] > (d - r)[None, :, None]).long()
    rr = r.expand(n, d + 1)[:, :, None]
    bb = (torch.zeros(n, dtype=torch.long, device=q.device) if b is None else b)[:, None, None].expand(n, d + 1, 1)
    return torch.cat([kq, rr, bb], 2)
