"""Training writes last.ckpt at every epoch end, also when an epoch is shorter than
trainer.checkpoint_every_steps (Lightning's step trigger alone never fired then: a kill lost every epoch)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from wsss.config import load_recipe
from wsss.engine.trainer import build_trainer, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SeenAtEpochStart(L.Callback):
    """Records, at each epoch's start, the step of the last.ckpt on disk (None if there is none)."""

    def __init__(self, path: Path):
        self.path, self.steps = path, []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.steps.append(torch.load(self.path, weights_only=True)["global_step"] if self.path.is_file() else None)


def test_last_checkpoint_is_written_at_every_epoch_end(tmp_path):
    cfg = load_recipe("configs/shapes_cam.yaml", ["trainer.checkpoint_every_steps=1000", "trainer.threads=1"])
    seen = _SeenAtEpochStart(tmp_path / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, tmp_path, epochs=3, max_steps=0, callbacks=[seen], steps_per_epoch=4)
    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 steps an epoch, far below 1000
    fit(trainer, _Tiny(), tmp_path, loader)
    assert seen.steps == [None, 4, 8]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no versioned copies
