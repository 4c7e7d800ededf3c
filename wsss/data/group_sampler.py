"""Group batches for group-wise semantic mining (Group-WSSS): an anchor plus N-1 partners sharing its labels.

A batch is a flat index list `[a1, p11, p12, a2, p21, p22, ...]` (group size N = 3 here), so the
default collate gives (B*N, ...) tensors and the training step reshapes them to (B, N, ...).

Partner rule of the official `VOCDataset.__getitem__`: draw images uniformly until one has exactly
the anchor's label vector; after `max_tries` failures accept any image containing one randomly chosen
class of the anchor. Differences, on purpose: the draws are bounded (vectorised) and seeded, and the
anchor itself is never its own partner unless it is the only candidate.

Anchors are a seeded permutation of the data set per epoch (the official loader had `shuffle=False`
because its map files were named by loader index; here maps are named by image id). Every process
draws the same permutation and takes every world_size-th anchor, so ranks get disjoint anchors.
Partners depend only on (seed, epoch, anchor), so a group is the same at any process count.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from wsss.engine import dist

__all__ = ["AnchorSampler", "GroupBatchSampler", "draw_partners", "group_ids"]


def draw_partners(labels: np.ndarray, anchor: int, count: int, rng: np.random.Generator, max_tries: int = 1000) -> list[int]:
    """`count` partner indices for `anchor` given all labels (M, K) multi-hot (the official rule, bounded)."""
    m = len(labels)
    keys = labels > 0.5
    target = keys[anchor]
    present = np.flatnonzero(target)
    partners = []
    for _ in range(count):
        draws = rng.integers(0, m, size=max_tries)
        draws = draws[draws != anchor]
        exact = draws[(keys[draws] == target).all(axis=1)] if len(draws) else draws
        if len(exact):
            partners.append(int(exact[0]))
            continue
        # fallback: an image sharing one randomly chosen class of the anchor (any image if it has none)
        if len(present):
            c = int(rng.choice(present))
            pool = np.flatnonzero(keys[:, c])
        else:
            pool = np.arange(m)
        pool = pool[pool != anchor]
        partners.append(int(rng.choice(pool)) if len(pool) else anchor)
    return partners


class AnchorSampler(Sampler[int]):
    """This rank's anchors: a seeded permutation per epoch, every world_size-th item (padded by wrap-around)."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.size, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world_size() if world_size is None else world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (it looks for `batch_sampler.sampler.set_epoch`)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        m = self.size
        order = np.random.default_rng([self.seed, self.epoch]).permutation(m) if self.shuffle else np.arange(m)
        total = len(self) * self.world
        order = np.resize(order, total) if total > m else order  # wrap around: every rank has as many anchors
        return iter(int(i) for i in order[self.rank :: self.world])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)


class GroupBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` groups (anchor + group_size-1 partners), flattened; DDP-aware, seeded per epoch."""

    def __init__(self, labels: np.ndarray, group_size: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 max_tries: int = 1000, drop_last: Optional[bool] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        """labels: (M, K) multi-hot of the data set's items; drop_last None: drop a short last batch if
        this rank has more than one batch (like wsss.engine.trainer.train_loader)."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.labels = np.asarray(labels)
        self.group_size, self.batch_size = int(group_size), int(batch_size)
        self.seed, self.max_tries = int(seed), int(max_tries)
        self.sampler = AnchorSampler(len(self.labels), seed, shuffle, rank, world_size)
        self.drop_last = len(self.sampler) > self.batch_size if drop_last is None else drop_last

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """A new permutation of anchors and new partners."""
        self.sampler.set_epoch(epoch)

    def anchors(self) -> list[int]:
        """This rank's anchors for the current epoch."""
        return list(self.sampler)

    def group(self, anchor: int) -> list[int]:
        """[anchor, partners...]: depends only on (seed, epoch, anchor)."""
        rng = np.random.default_rng([self.seed, self.epoch, anchor, 1])
        return [anchor, *draw_partners(self.labels, anchor, self.group_size - 1, rng, self.max_tries)]

    def __iter__(self) -> Iterator[list[int]]:
        anchors = self.anchors()
        for start in range(0, len(anchors), self.batch_size):
            chunk = anchors[start : start + self.batch_size]
            if len(chunk) < self.batch_size and self.drop_last:
                return
            yield [i for a in chunk for i in self.group(a)]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def group_ids(batch_ids: Sequence[str], group_size: int) -> list[list[str]]:
    """Flat ids of a batch -> one list per group (anchor first)."""
    return [list(batch_ids[i : i + group_size]) for i in range(0, len(batch_ids), group_size)]
