"""What the stage scripts share: devices, data sets and loaders, memory, and the
`python -m wsss.stages.<stage> RECIPE [key=value ...]` entry point. Stages import helpers from here,
never from each other."""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from wsss.config import options, plain
from wsss.crf import presets
from wsss.crf.presets import CRFParams
from wsss.data import SegDataset, build_dataset
from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.errors import ConfigError
from wsss.io import atomic
from wsss.io.images import image_size
from wsss.registry import CAM_METHODS, REGULARIZERS, SEG_METHODS, STAGES

log = logging.getLogger("wsss")


def setup_logging(verbose: bool = False) -> None:
    """Plain, rank-aware console logging."""
    level = logging.DEBUG if verbose else logging.INFO
    prefix = f"[rank {dist.rank()}] " if dist.is_distributed() else ""
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stdout, force=True)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "timm", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cam_split(cfg: DictConfig) -> str:
    """The split CAMs and pseudo masks are made for (cam_infer.split, default the train split)."""
    return cfg.cam_infer.split or cfg.data.train_split


def inference_device(cfg: DictConfig) -> torch.device:
    """Where per-image stages run: trainer.accelerator=cpu forces the CPU; otherwise this process's GPU if any."""
    if cfg.trainer.accelerator == "cpu":
        return torch.device("cpu")
    return dist.device()


def crf_params(section: Any) -> CRFParams:
    """A recipe's CRF section (preset + overrides, -1 = the preset's) -> CRFParams."""
    return presets.resolve(**{k: section[k] for k in ("preset", *presets.FIELDS)})


def cam_method(cfg: DictConfig, num_classes: int) -> Any:
    """The recipe's CAM method (a LightningModule) built from plain arguments; num_classes includes background."""
    name = cfg.cam.method
    return CAM_METHODS.get(name)(plain(cfg.cam.backbone), num_classes, plain(cfg.cam), options(cfg, "cam", name))


def loss_spec(cfg: DictConfig, pixel: Optional[str] = None) -> Any:
    """The recipe's segmentation loss as plain values (`pixel` replaces seg.loss.name, e.g. cyclic rounds)."""
    from wsss.engine.modules import LossSpec

    loss = cfg.seg.loss
    pixel = pixel or loss.name
    reg = loss.regularizer
    uses = {u: options(cfg, "seg.loss", u) for u in (REGULARIZERS.uses.get(reg, ()) if reg else ())}
    return LossSpec(pixel, options(cfg, "seg.loss", pixel), reg, options(cfg, "seg.loss", reg), uses)


def seg_method(cfg: DictConfig, class_names: list[str], loss: Any = None) -> Any:
    """The recipe's segmentation method (a LightningModule) built from plain arguments (loss None: inference)."""
    name = cfg.seg.method
    return SEG_METHODS.get(name)(plain(cfg.seg), len(class_names), class_names, loss, options(cfg, "seg", name))


def load_predictor(cfg: DictConfig, model_dir: Path, class_names: list[str], device: torch.device) -> Any:
    """The segmentation method trained into `model_dir`, ready to predict on `device`."""
    from wsss.engine.export import load_weights
    from wsss.engine.predictor import Predictor

    method = seg_method(cfg, class_names)
    load_weights(method.net, model_dir, "seg", class_names)
    return Predictor(method, device)


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
    return ds.read_saliency_from(rd.sub("saliency"), rd.cfg.saliency.source)


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
    from wsss.errors import run_guarded
    from wsss.pipeline import open_run

    parser = argparse.ArgumentParser(prog=f"python -m wsss.stages.{stage}", description=description)
    parser.add_argument("recipe", help="recipe YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seg.lr=0.01")
    parser.add_argument("--force", action="store_true", help="rerun even if outputs exist for this config")
    args = parser.parse_args()
    setup_logging()
    run_guarded(lambda: run_fn(open_run(args.recipe, args.overrides, args.force)))


def feature_cached(rd: RunDir, module: Any, targets: Any) -> tuple[Any, dict]:
    """`targets` (a SegmentationSet) read from the frozen encoder's feature cache when seg.feature_cache
    allows it (the cache filled first), else unchanged; plus the cache's metrics ({} when off)."""
    from wsss.data.feature_crops import CachedFeatureSet
    from wsss.engine.feature_cache import cache_key, cache_layout, encoder_digest, fill_feature_cache
    from wsss.errors import ConfigError

    seg = rd.cfg.seg
    mode = str(seg.feature_cache.enabled).lower()
    if mode == "false":
        return targets, {}
    encoder = module.cacheable_encoder()
    reason = ""
    if encoder is None:
        reason = f"seg.method={seg.method} with this encoder: the encoder trains, or the method does not read cached features"
    elif seg.color_jitter > 0:
        reason = "seg.color_jitter > 0 changes the images at every epoch"
    if not reason:
        layout = cache_layout(module, seg.feature_cache.scales, seg.scale_range, seg.hflip)
        if seg.crop_size % layout.alignment:
            reason = f"seg.crop_size {seg.crop_size} is not a multiple of the encoder's coarsest stride {layout.alignment}"
    if reason:
        if mode == "true":
            raise ConfigError(f"seg.feature_cache.enabled=true: {reason}")
        log.info("feature cache: off (%s)", reason)
        return targets, {}
    d = rd.cfg.data
    meta = {"encoder": seg.encoder.name, "weights": encoder_digest(encoder),
            "output_stride": seg.encoder.output_stride, "dataset": d.dataset, "root": str(Path(d.root).expanduser().resolve()) if d.root else "",
            "split": d.train_split, "max_pixels": d.max_pixels, "image_mode": d.image_mode,
            "views": layout.views(), "levels": layout.levels}
    root = Path(seg.feature_cache.root).expanduser() if seg.feature_cache.root else rd.sub("feature_cache")
    cache_dir = root / cache_key(meta)
    device = inference_device(rd.cfg)
    module.to(device)
    stats = fill_feature_cache(encoder, module.norm, targets.base, targets.base.ids, cache_dir, layout, meta, device,
                               rd.cfg.trainer.num_workers, module.channels_last)
    module.cpu()
    log.info("feature cache: %d images x %d views, levels %s, %.1f MB in %s (%d computed in %.1f s)",
             stats["images"], len(layout.views()), list(layout.levels), stats["megabytes"], cache_dir, stats["computed"],
             stats["seconds"])
    cached = CachedFeatureSet(targets, cache_dir, layout, seg.crop_size, seg_seed(rd.cfg))
    where = str(cache_dir.relative_to(rd.path)) if cache_dir.is_relative_to(rd.path) else str(cache_dir)
    return cached, {"feature_cache": {"dir": where, "views": len(layout.views()), **stats}}


def round_outputs(rd: RunDir, stage: str) -> list[Path]:
    """Every round folder the stage's table entry declares (`pseudo_r*`, `seg_r*`), whatever the current
    number of rounds: a stale config must not leave a later round behind for a longer run to pick up."""
    return sorted(p for pattern in STAGES.get(stage).outputs for p in rd.path.glob(pattern)
                  if re.fullmatch(r".+_r\d+", p.name))


def kept_round_metrics(rd: RunDir, stage: str, k: int) -> dict[str, Any]:
    """Round k's training record from the stage's last run, for a round kept when the run is extended."""
    previous = rd.metrics(stage).get(f"r{k}_train")
    return {f"r{k}_train": previous} if previous is not None else {}


def seg_seed(cfg: DictConfig) -> int:
    """The segmenter's seed: seg.seed, or trainer.seed when it is -1."""
    return cfg.seg.seed if cfg.seg.seed >= 0 else cfg.trainer.seed


def holdout_split(ds: SegDataset, fraction: float) -> tuple[SegDataset, Optional[SegDataset]]:
    """(training part, held-out part) of the train split for seg.convergence.holdout (no held-out part at 0).

    The held-out ids are fixed by the ids alone (wsss.data.splits.split_holdout), the same for every
    seed and process count; they need ground-truth masks, since they are validated on.
    """
    from wsss.data.splits import split_holdout

    if fraction <= 0:
        return ds, None
    if not ds.has_masks:
        raise ConfigError("seg.convergence.holdout: the held-out part is validated on ground-truth masks, and the "
                          "train split has none; set seg.convergence.holdout=0")
    if len(ds) < 2:
        raise ConfigError(f"seg.convergence.holdout: holding out a part needs at least 2 training images, got {len(ds)}")
    kept, held = split_holdout(ds.ids, fraction)
    return ds.select(kept), ds.select(held)


def validation_plan(cfg: DictConfig, out: Path, class_names: list[str], held: Optional[SegDataset],
                    keep_best_val: bool) -> tuple[Optional[SegDataset], int, Any]:
    """(images validated on or None, validate every N epochs, a KeepBestVal callback or None) for train_segmenter.

    With a held-out part (convergence protocol): that part every max(1, seg.val_every) epochs, its best
    weights kept, stopping seg.convergence.patience epochs after them. Else the val split every
    seg.val_every epochs for monitoring, or, with keep_best_val, every max(1, seg.val_every) epochs
    with the best weights kept.
    """
    from wsss.engine.trainer import KeepBestVal

    if held is not None:
        keep = KeepBestVal(out, cfg.seg, class_names, "holdout/miou", "best_holdout", cfg.seg.convergence.patience)
        return held, max(1, cfg.seg.val_every), keep
    val_every = max(1, cfg.seg.val_every) if keep_best_val else cfg.seg.val_every
    val = split_dataset(cfg, cfg.eval.split or cfg.data.val_split) if val_every > 0 else None
    if val is None or not val.has_masks:
        return None, 0, None
    return val, val_every, KeepBestVal(out, cfg.seg, class_names) if keep_best_val else None


def protocol_note(convergence: Any, held_images: int) -> str:
    """How the convergence protocol ends a run, for the log line that starts it."""
    stop = (f" at most, early stopping on {held_images} held-out images" if convergence.patience > 0
            else f", validating {held_images} held-out images every epoch")
    return stop + f", keeping the {convergence.keep} weights"


def train_segmenter(rd: RunDir, out: Path, source: str, pseudo_dir: Optional[Path], pixel_loss: Optional[str] = None,
                    keep_best_val: bool = False, init: Optional[Path] = None) -> dict:
    """Train one segmentation method into `out` (train_seg and every cyclic round); returns its metrics.

    keep_best_val: validate every seg.val_every epochs (>= 1) and export the weights with the best val
    mIoU (PMM's official model selection; it looks at val ground truth). init: a model dir whose
    weights start the network where names and shapes agree (AuxSegNet's warm starts); a resumed
    checkpoint wins over it. seg.convergence.holdout > 0 (docs/protocol.md): the held-out part of
    the train split never trains; it is validated instead of val, training stops when its mIoU has
    not improved for seg.convergence.patience epochs, and its best weights (seg.convergence.keep=best)
    or its last ones (keep=last) become the model.
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from wsss.data.transforms import InferenceSet, SegmentationSet, collate_list, train_augment
    from wsss.engine.export import export_net, load_shared_weights, load_weights
    from wsss.engine.trainer import build_trainer, configure_threads, fit

    began = time.time()
    cfg = rd.cfg
    configure_threads(cfg)
    seed = seg_seed(cfg)
    L.seed_everything(seed, workers=True, verbose=False)
    ds = with_run_saliency(rd, split_dataset(cfg, cfg.data.train_split))
    ds, held = holdout_split(ds, cfg.seg.convergence.holdout)  # from here on `ds` is what trains
    module = seg_method(cfg, ds.class_names, loss_spec(cfg, pixel_loss))
    if init is not None:
        log.info("%s: starting from %d tensors of %s", out.name, load_shared_weights(module.net, init), init)
    train_set = SegmentationSet(ds, source, train_augment(cfg.seg, with_masks=True, seed=seed), pseudo_dir)
    train_set, cache_metrics = feature_cached(rd, module, train_set)
    loader = module.train_loader(train_set, cfg.seg.batch_size, cfg.trainer.num_workers, seed, module.options)
    val, val_every, keep = validation_plan(cfg, out, ds.class_names, held, keep_best_val)
    val_loader = None
    if val is not None:
        val_loader = DataLoader(InferenceSet(val, val.ids, ("image", "mask")), batch_size=1, collate_fn=collate_list,
                                num_workers=cfg.trainer.num_workers)
        if held is not None:  # logged apart from val, which the protocol only reports
            module.val_metric = "holdout/miou"
    trainer = build_trainer(cfg, out, cfg.seg.epochs, cfg.seg.max_steps, val_every=val_every,
                            steps_per_epoch=len(loader), callbacks=[*module.callbacks(out), *([keep] if keep else [])])
    loss = module.loss_spec
    log.info("%s: %s %s/%s on %d images, labels=%s, loss=%s%s, %s%s", out.name, cfg.seg.method, cfg.seg.arch,
             cfg.seg.encoder.name, len(ds), source, loss.pixel, f" + {loss.regularizer}" if loss.regularizer else "",
             f"{cfg.seg.max_steps} steps" if cfg.seg.max_steps > 0 else f"{cfg.seg.epochs} epochs",
             protocol_note(cfg.seg.convergence, len(held)) if held is not None else "")
    if held is not None and dist.is_main():  # which images were held out, for the record
        atomic.write_text(out / "holdout.txt", "".join(f"{sid}\n" for sid in held.ids))
    start = fit(trainer, module, out, loader, val_loader)
    if dist.is_main():
        keep_last = held is not None and cfg.seg.convergence.keep == "last"
        if keep is not None and keep.step >= 0 and not keep_last:  # best-val (or best held-out) weights become the model
            load_weights(module.net, keep.out, "seg", ds.class_names)
        export_net(module.net, out, "seg", cfg.seg, ds.class_names)
    dist.barrier()
    metrics = {"steps": int(trainer.global_step), "resumed_from_step": start, "images": len(ds), "labels": source,
               "loss": loss.pixel + (f"+{loss.regularizer}" if loss.regularizer else ""),
               "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))), **cache_metrics}
    if held is not None:
        found = keep.step >= 0
        metrics.update(holdout_images=len(held), holdout_best_miou=round(keep.best, 4) if found else None,
                       holdout_best_epoch=keep.epoch if found else None, holdout_best_step=keep.step if found else None,
                       stopped_at_epoch=int(trainer.current_epoch), stopped_early=bool(keep.stopped_epoch),
                       holdout_last_miou=round(keep.last, 4) if found else None, kept=cfg.seg.convergence.keep)
    elif keep is not None:
        metrics.update(selected_step=keep.step, selected_val_miou_uses_gt=round(keep.best, 4) if keep.step >= 0 else None)
    elif "val/miou" in trainer.callback_metrics:
        metrics["last_val_miou_monitor"] = float(trainer.callback_metrics["val/miou"])
    metrics["seconds"] = round(time.time() - began, 1)  # of this call (a resumed training: since the resume)
    return metrics
