"""What every trainable method (CAM or segmentation) shares: its network, input preparation, the
training step that logs its loss parts, the data hook and extra callbacks. Subclasses say what the
network is and what its loss is (wsss/cam/methods.py, wsss/engine/modules.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from wsss.data.transforms import Normalizer
from wsss.engine.trainer import train_loader
from wsss.models.backbones import normalization


class TrainableMethod(L.LightningModule):
    """`net` built by `build_net`, images normalised for `backbone`'s weights, `loss` logged per part."""

    def __init__(self, backbone: Any, net: torch.nn.Module):
        """backbone: the BackboneConfig-like settings whose weights fix the normalisation and memory format."""
        super().__init__()
        self.net = net
        self.norm = Normalizer(*normalization(backbone))
        self.channels_last = bool(backbone.channels_last)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised images x (N, 3, H, W) and the batch -> (loss, logged parts)."""
        raise NotImplementedError

    @classmethod
    def train_loader(cls, dataset: Dataset, batch_size: int, num_workers: int, seed: int, options: Any = None) -> DataLoader:
        """The training loader (the data hook): by default shuffled batches, the same at any process count."""
        return train_loader(dataset, batch_size, num_workers, seed)

    def callbacks(self, out_dir: Path) -> list[L.Callback]:
        """Extra Lightning callbacks for training into `out_dir`."""
        return []

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) 0..255 -> normalised, in the memory format the network runs fastest in."""
        x = self.norm(images)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.loss(self.prepare(batch["image"]), batch)
        for k, v in parts.items():
            self.log(f"train/{k}", v)
        self.log("train/loss", loss, prog_bar=True)
        return loss
