"""Lightning Trainer construction: devices, DDP under torchrun, atomic resumable checkpoints, loggers."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from wsss.data.transforms import seed_worker
from wsss.engine import dist
from wsss.errors import CheckpointError, ConfigError
from wsss.io import atomic
from wsss.models.backbones import describe_mismatch, torch_load_problem

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed (a kill never leaves half a file),
    and loaded with weights_only=True (no pickled code runs). A checkpoint whose weights do not fit
    the model being trained is a CheckpointError naming the keys."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Optional[L.Trainer] = None  # set by build_trainer; gives the model to check against

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Optional[Any] = None) -> None:
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # through a Python file, a full disk is an OSError (RunDirError), not a zip error

    def load_checkpoint(self, path: str | Path, map_location: Optional[Any] = "cpu", weights_only: Optional[bool] = None) -> dict[str, Any]:
        try:  # weights_only=True whatever the caller asks: a checkpoint file may come from anywhere
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means unsafe or corrupt
            raise CheckpointError(f"{path}: cannot load checkpoint safely ({torch_load_problem(e)}); "
                                  "delete it to train from the start") from None
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            problem = describe_mismatch(module.state_dict(), checkpoint["state_dict"])
            if problem:
                raise CheckpointError(f"{path}: checkpoint of another recipe or backbone ({problem}); "
                                      "delete it, or use another run.name")
        return checkpoint


class ResumeBookkeeping(L.Callback):
    """Remembers the step training started at (after restoring a checkpoint), and saves the logs
    with every checkpoint, so a resumed run's training curves have no gap."""

    step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = int(trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()


class SaveAtEpochEnd(L.Callback):
    """Writes `last.ckpt` at the end of every training epoch (after its validation, so KeepBestVal's
    state is in it). Lightning's ModelCheckpoint with every_n_train_steps writes `last` only at those
    steps: a run whose epochs are shorter than trainer.checkpoint_every_steps lost every epoch to a kill."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)  # every rank calls it; the strategy writes once (atomic IO)


class KeepBestVal(L.Callback):
    """Exports the weights with the best validation mIoU seen so far to `<out>/<folder>/`, and with
    patience > 0 stops training once `patience` epochs have passed without a better one.

    monitor: the logged mIoU, `val/miou` (PMM's best-val selection: uses val ground truth, folder
    best_val) or `holdout/miou` (the convergence protocol's held-out part, folder best_holdout).
    """

    def __init__(self, out: Path, section: Any, class_names: list[str], monitor: str = "val/miou",
                 folder: str = "best_val", patience: int = 0):
        self.out, self.section, self.class_names = out / folder, section, class_names
        self.monitor, self.patience = monitor, patience
        self.best, self.step = float("-inf"), -1
        self.last = float("nan")  # the latest validated mIoU
        self.epoch = 0  # epochs trained when the best was reached (1-based)
        self.stopped_epoch = 0  # epochs trained when patience ran out (0 = not stopped)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.stopped_epoch:  # resumed from a checkpoint saved after the decision to stop: train no further
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from wsss.engine.export import export_net

        miou = trainer.callback_metrics.get(self.monitor)
        if miou is None or trainer.sanity_checking:
            return
        epoch = int(trainer.current_epoch) + 1
        self.last = float(miou)
        if float(miou) > self.best:
            self.best, self.step, self.epoch = float(miou), int(trainer.global_step), epoch
            if trainer.is_global_zero:
                export_net(module.net, self.out, "seg", self.section, self.class_names)
        if self.patience > 0:
            # every process validates the same images, so they agree; the vote keeps them in step regardless
            stop = trainer.strategy.reduce_boolean_decision(epoch - self.epoch >= self.patience, all=False)
            if stop and not self.stopped_epoch:
                trainer.should_stop, self.stopped_epoch = True, epoch

    def state_dict(self) -> dict:  # saved in checkpoints, so a resumed run remembers the best so far
        return {"best": self.best, "step": self.step, "epoch": self.epoch, "stopped_epoch": self.stopped_epoch,
                "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.step = state["best"], state["step"]
        self.epoch, self.stopped_epoch = state.get("epoch", 0), state.get("stopped_epoch", 0)  # older checkpoints lack them
        self.last = state.get("last", float("nan"))


def configure_threads(cfg: DictConfig) -> None:
    """Apply trainer.threads (torch intra-op threads) if set."""
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)


def accelerator(cfg: DictConfig) -> str:
    acc = cfg.trainer.accelerator
    return "gpu" if acc == "cuda" else acc


def build_trainer(cfg: DictConfig, out_dir: Path, epochs: int, max_steps: int, val_every: int = 0,
                  callbacks: Iterable[Any] = (), steps_per_epoch: int | None = None) -> L.Trainer:
    """A Trainer that saves `out_dir/checkpoints/last.ckpt` regularly and logs to `out_dir/logs`."""
    if dist.is_distributed():
        devices: Any = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
        num_nodes = max(1, dist.world_size() // devices)
        strategy: Any = "ddp"
    else:
        dev = str(cfg.trainer.devices)
        if dev not in ("auto", "1"):
            raise ConfigError("trainer.devices: to train on several devices launch the same command with "
                              "torchrun --nproc_per_node=N (see README, 'Scaling'); trainer.devices then follows it")
        devices, num_nodes, strategy = 1, 1, "auto"
    every = max(1, cfg.trainer.checkpoint_every_steps)
    # only last.ckpt (what a rerun resumes from): no second full copy of every checkpoint
    # no version counter: SaveAtEpochEnd writes the same last.ckpt, which must be overwritten, not versioned
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=every,
                           enable_version_counter=False)
    if cfg.trainer.logger == "tensorboard":
        logger: Any = TensorBoardLogger(save_dir=str(out_dir), name="logs", version="")
    else:
        logger = CSVLogger(save_dir=str(out_dir), name="logs", version="")
    quiet_lightning()
    log_every = max(1, min(10, steps_per_epoch or 10))
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    # a resumed run's earlier rows are set aside and merged back (fit: _set_aside_log / _merge_log)
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
    # frozen stages and frozen BatchNorm are kept in eval mode on purpose (backbones.freeze)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    io = AtomicCheckpointIO()
    trainer = L.Trainer(
        accelerator=accelerator(cfg), devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=cfg.trainer.precision,
        max_epochs=epochs if max_steps <= 0 else -1, max_steps=max_steps if max_steps > 0 else -1,
        callbacks=[ckpt, SaveAtEpochEnd(out_dir / "checkpoints" / "last.ckpt"), ResumeBookkeeping(), *callbacks],
        logger=logger, plugins=[io],
        default_root_dir=str(out_dir), enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=val_every if val_every > 0 else None if max_steps > 0 else 10**9,
        log_every_n_steps=log_every, deterministic=cfg.trainer.deterministic or False,
        use_distributed_sampler=False,  # our loaders shard themselves (train_loader; a method's own sampler)
    )
    io.trainer = trainer
    return trainer


def quiet_lightning() -> None:
    """Lightning announces devices and tips at INFO on its own handler; keep the console to our messages."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.pytorch.utilities._pytree")


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """Shuffled training batches that do not depend on the number of processes.

    Every process draws the same seeded permutation (per epoch) and takes every world_size-th
    sample of it, so N processes with batch b see, step by step, exactly the samples that one
    process with batch N*b sees. Lightning keeps this sampler under DDP and sets its epoch.
    """
    world = dist.world_size()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=dist.rank(), shuffle=True, seed=seed)
    per_rank = math.ceil(len(dataset) / world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=per_rank > batch_size,
                      num_workers=num_workers, persistent_workers=num_workers > 0, worker_init_fn=seed_worker)


def fit(trainer: L.Trainer, module: L.LightningModule, out_dir: Path, train: DataLoader,
        val: Optional[DataLoader] = None, name: str = "") -> int:
    """`trainer.fit`, resuming from `out_dir/checkpoints/last.ckpt` if a killed run left one.

    Returns the step training started from (0 for a fresh start). Ctrl-C raises KeyboardInterrupt
    (Lightning itself would exit with status 1 and leave Ctrl-C ignored).
    """
    resume = resume_path(out_dir)
    if resume:
        log.info("%s: resuming from %s", name or out_dir.name, resume)
        if dist.is_main():
            _set_aside_log(out_dir / "logs")
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, train, val_dataloaders=val, ckpt_path=resume)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread() and handler is not None:
            signal.signal(signal.SIGINT, handler)
    start = next((c.step for c in trainer.callbacks if isinstance(c, ResumeBookkeeping)), 0)
    if dist.is_main():
        _merge_log(out_dir / "logs", start)
    return start


def _set_aside_log(logs: Path) -> None:
    """Lightning's CSV logger starts metrics.csv afresh: keep the rows of the killed attempt(s) aside."""
    current = _read_rows(logs / "metrics.csv")  # an earlier resumed attempt's rows replace what they redid
    first = min((int(r["step"]) for r in current if r.get("step", "").isdigit()), default=None)
    rows = [r for r in _read_rows(logs / "metrics.before-resume.csv") if first is None or _step(r) < first] + current
    if rows:
        _write_rows(logs / "metrics.before-resume.csv", rows)


def _merge_log(logs: Path, start_step: int) -> None:
    """metrics.csv = rows logged before the resumed checkpoint's step + this attempt's rows."""
    aside = logs / "metrics.before-resume.csv"
    if not aside.is_file():
        return
    earlier = [r for r in _read_rows(aside) if _step(r) < start_step]
    _write_rows(logs / "metrics.csv", earlier + _read_rows(logs / "metrics.csv"))
    aside.unlink()


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        # a row cut short by a kill has missing fields (None): dropped
        return [r for r in csv.DictReader(f) if None not in r and None not in r.values()]


def _step(row: dict[str, str]) -> int:
    return int(row["step"]) if row.get("step", "").isdigit() else 1 << 62


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


def resume_path(out_dir: Path) -> Optional[str]:
    """`out_dir/checkpoints/last.ckpt` if an interrupted run left one."""
    last = out_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float) -> torch.optim.lr_scheduler.LRScheduler:
    """lr = base_lr * (1 - step / total) ** power, stepped every optimiser step."""
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(1, total_steps), power=power)


def sgd_with_groups(backbone_params: Iterable[torch.nn.Parameter], new_params: Iterable[torch.nn.Parameter],
                    train_cfg: Any) -> torch.optim.SGD:
    """SGD where new layers learn at lr x new_layer_lr_mult (IRN/PSA parameter groups)."""
    new = [p for p in new_params if p.requires_grad]
    new_ids = {id(p) for p in new}
    base = [p for p in backbone_params if p.requires_grad and id(p) not in new_ids]
    groups = [{"params": base, "lr": train_cfg.lr}, {"params": new, "lr": train_cfg.lr * train_cfg.new_layer_lr_mult}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=train_cfg.lr, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay)
