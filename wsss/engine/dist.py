"""Process-group helpers: the same code runs alone or under `torchrun` (one process per device).

Per-image stages shard the id list by rank (`shard`), write per-image files, then meet at a barrier;
training stages leave DDP to Lightning, which reads the same torchrun environment.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def init() -> None:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) if launched with several processes."""
    if not is_distributed() or torch_dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch_dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))


def barrier() -> None:
    """Wait for every process (no-op when alone)."""
    if is_distributed():
        init()
        if torch.cuda.is_available() and torch_dist.get_backend() == "nccl":
            torch_dist.barrier(device_ids=[local_rank()])
        else:
            torch_dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every world_size-th item starting at rank (no gaps, no overlap)."""
    return list(items[rank()::world_size()])


def all_sum(value: float) -> float:
    """Sum of `value` over all processes (itself when alone), e.g. images computed per rank."""
    return _all_reduce(value, torch_dist.ReduceOp.SUM)


def all_max(value: float) -> float:
    """Largest `value` over all processes, e.g. the slowest rank's seconds."""
    return _all_reduce(value, torch_dist.ReduceOp.MAX)


def _all_reduce(value: float, op: torch_dist.ReduceOp) -> float:
    if not is_distributed():
        return value
    init()
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors
    on = device() if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=on)
    torch_dist.all_reduce(t, op=op)
    return t.item()


def device() -> torch.device:
    """The device for this process's inference work (its local GPU under torchrun, else CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() if is_distributed() else torch.cuda.current_device())
    return torch.device("cpu")
