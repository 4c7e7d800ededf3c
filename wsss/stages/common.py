"""What every stage script shares: loading the recipe into a run directory, devices, data loaders,
and the `python -m wsss.stages.<stage> RECIPE [key=value ...]` entry point."""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from wsss.config import load_recipe
from wsss.data import SegDataset, build_dataset
from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.io.images import image_size

log = logging.getLogger("wsss")


def setup_logging(verbose: bool = False) -> None:
    """Plain, rank-aware console logging."""
    level = logging.DEBUG if verbose else logging.INFO
    prefix = f"[rank {dist.rank()}] " if dist.is_distributed() else ""
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stdout, force=True)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "timm", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_run(recipe: str | None, overrides: Iterable[str] = (), force: bool = False) -> RunDir:
    """Resolve the recipe and prepare its run directory (config.yaml, manifest.json)."""
    cfg = load_recipe(recipe, list(overrides))
    dist.init()
    return RunDir(cfg, force=force).prepare()


def inference_device(cfg: DictConfig) -> torch.device:
    """Where per-image stages run: trainer.accelerator=cpu forces the CPU; otherwise this process's GPU if any."""
    if cfg.trainer.accelerator == "cpu":
        return torch.device("cpu")
    return dist.device()


def split_dataset(cfg: DictConfig, split: str) -> SegDataset:
    """The data set for one split (its bad samples dropped first when data.skip_bad is set)."""
    ds = build_dataset(cfg.data, split)
    if cfg.data.skip_bad:
        ds.check(("image", "labels", "mask") if ds.has_masks else ("image", "labels"))
    return ds


def with_run_saliency(rd: RunDir, ds: SegDataset) -> SegDataset:
    """`ds` reading its saliency from the run's `saliency/<id>.png` when the saliency stage is part of the run.

    Later stages call this on the data set they load, so a run's own maps (stage `saliency`) replace the
    data set's (data.saliency_dir); without the stage, `ds` is returned unchanged.
    """
    if "saliency" not in rd.cfg.run.stages:
        return ds
    from wsss.data.saliency_dir import SaliencyFromDir

    return SaliencyFromDir(ds, rd.sub("saliency"), rd.cfg.saliency.source)


def size_groups(ds: SegDataset, ids: list[str], batch_size: int) -> list[list[str]]:
    """Batches of ids whose images share a size (read from headers), keeping the list order within a size."""
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for sid in ids:
        by_size[image_size(ds.image_path(sid), ds.max_pixels)].append(sid)
    groups = []
    for members in by_size.values():
        for i in range(0, len(members), batch_size):
            groups.append(members[i : i + batch_size])
    return groups


class GroupLoader(torch.utils.data.Dataset):
    """Loads a group of equally sized images (and their labels) so workers decode ahead of the model."""

    def __init__(self, ds: SegDataset, groups: list[list[str]], parts: tuple[str, ...] = ("image", "labels")):
        self.ds, self.groups, self.parts = ds, groups, parts

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [dict(self.ds.load(sid, self.parts)) for sid in self.groups[i]]


def iterate_groups(ds: SegDataset, groups: list[list[str]], num_workers: int,
                   parts: tuple[str, ...] = ("image", "labels")) -> Iterator[list[dict[str, Any]]]:
    """Yield loaded groups, decoded by `num_workers` background processes."""
    loader = torch.utils.data.DataLoader(GroupLoader(ds, groups, parts), batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=lambda x: x)
    yield from loader


def stack_images(samples: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
    """List of (H, W, 3) uint8 images of one size -> (B, 3, H, W) float 0..255 on `device`."""
    arr = np.stack([s["image"] for s in samples])
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float()


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Give freed memory back to the OS after a batch.

    glibc keeps the memory of freed tensors for reuse; with images of many sizes it fragments and
    the process grows with every new size (voc12-mini, 100 sizes: 1.0 -> 2.8 GB). Trimming after
    each batch keeps a streaming stage's memory flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def stage_main(stage: str, run_fn: Callable[[RunDir], Any], description: str) -> None:
    """Entry point of `python -m wsss.stages.<stage> RECIPE [key=value ...] [--force]`."""
    from wsss.cli import run_guarded

    parser = argparse.ArgumentParser(prog=f"python -m wsss.stages.{stage}", description=description)
    parser.add_argument("recipe", help="recipe YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seg.lr=0.01")
    parser.add_argument("--force", action="store_true", help="rerun even if outputs exist for this config")
    args = parser.parse_args()
    setup_logging()
    run_guarded(lambda: run_fn(open_run(args.recipe, args.overrides, args.force)))
