"""Lightning Trainer construction: devices, DDP under torchrun, atomic resumable checkpoints, loggers."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from wsss.engine import dist
from wsss.errors import CheckpointError, ConfigError
from wsss.io import atomic

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed (a kill never leaves half a file),
    and loaded with weights_only=True (no pickled code runs)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Optional[Any] = None) -> None:
        with atomic.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | Path, map_location: Optional[Any] = "cpu", weights_only: Optional[bool] = None) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means unsafe or corrupt
            raise CheckpointError(f"{path}: cannot load checkpoint safely ({str(e).splitlines()[0][:300]})") from None


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
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="step{step:06d}", save_last=True,
                           save_top_k=1, every_n_train_steps=every, save_on_train_epoch_end=True,
                           auto_insert_metric_name=False)
    if cfg.trainer.logger == "tensorboard":
        logger: Any = TensorBoardLogger(save_dir=str(out_dir), name="logs", version="")
    else:
        logger = CSVLogger(save_dir=str(out_dir), name="logs", version="")
    quiet_lightning()
    log_every = max(1, min(10, steps_per_epoch or 10))
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    return L.Trainer(
        accelerator=accelerator(cfg), devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=cfg.trainer.precision,
        max_epochs=epochs if max_steps <= 0 else -1, max_steps=max_steps if max_steps > 0 else -1,
        callbacks=[ckpt, *callbacks], logger=logger, plugins=[AtomicCheckpointIO()],
        default_root_dir=str(out_dir), enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=val_every if val_every > 0 else None if max_steps > 0 else 10**9,
        log_every_n_steps=log_every, deterministic=cfg.trainer.deterministic or False,
        use_distributed_sampler=True,
    )


def quiet_lightning() -> None:
    """Lightning announces devices and tips at INFO on its own handler; keep the console to our messages."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.pytorch.utilities._pytree")


def resume_path(out_dir: Path) -> Optional[str]:
    """`out_dir/checkpoints/last.ckpt` if an interrupted run left one."""
    last = out_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = base_lr * (1 - step / total) ** power, stepped every optimiser step."""
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - min(step, total - 1) / total) ** power)


def sgd_with_groups(backbone_params: Iterable[torch.nn.Parameter], new_params: Iterable[torch.nn.Parameter],
                    train_cfg: Any) -> torch.optim.SGD:
    """SGD where new layers learn at lr x new_layer_lr_mult (IRN/PSA parameter groups)."""
    new = [p for p in new_params if p.requires_grad]
    new_ids = {id(p) for p in new}
    base = [p for p in backbone_params if p.requires_grad and id(p) not in new_ids]
    groups = [{"params": base, "lr": train_cfg.lr}, {"params": new, "lr": train_cfg.lr * train_cfg.new_layer_lr_mult}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=train_cfg.lr, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay)
