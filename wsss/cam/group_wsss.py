"""`cam.method: group`: Group-WSSS (group-wise semantic mining, Li et al., AAAI 2021) as a CAM method.

Training sees groups (an anchor plus N-1 images sharing its labels, wsss/data/group_sampler.py) resized
to a fixed square and colour-jittered (the official transform), runs the graph network of
wsss/models/group_graph.py and applies the official loss. A callback keeps, per image, the running
pixel-wise maximum of the official localization map relu((h^0 + h^T) / 2) in `cam/accumulated/`
(wsss/cam/accumulate.py); the stage `accumulated_cams` turns them into `cams/<id>.npz`. The other
choice, the stage `cam`, is ordinary multi-scale CAM inference with the trained network (the initial
class maps h^0, one image at a time). docs/methods/group_wsss.md maps paper terms to code and keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsss.cam.accumulate import AccumulatedMaps
from wsss.cam.methods import CamMethod
from wsss.data.group_sampler import GroupBatchSampler
from wsss.data.transforms import to_tensor_image
from wsss.engine.trainer import poly_schedule
from wsss.errors import ConfigError
from wsss.registry import CAM_METHODS

__all__ = ["GroupOptions", "GroupWSSS", "GroupViews", "MapAccumulation", "group_loss"]


@dataclass
class GroupOptions:
    """`cam.group`: Group-WSSS. Defaults are the official code's; the paper's variants are options."""

    group_size: int = 3  # N images per group (code 3; the paper's figure shows 4)
    steps: int = 3  # T message-passing rounds (propagate_layers)
    node: str = "cams"  # cams (code: K-channel class maps are the nodes) | features (the head's features)
    head_convs: int = 3  # extra_convs: 3x3 conv + ReLU layers before the 1x1 classifier
    head_channels: int = 512
    proj_channels: int = 0  # co-attention projection width (0 = half the node channels, as the code)
    aggregate: str = "concat"  # concat (code: 3x3 conv over the N-1 messages) | mean
    graph_dropout: bool = True  # the graph dropout layer after every update
    drop_rate: float = 0.8  # probability of the drop-mask branch (else the importance map)
    drop_threshold: float = 0.7  # drop positions above this fraction of the max
    dropout_at_eval: bool = False  # true = the code's layer, stochastic in every forward
    init_weight: float = 0.4  # loss weight of the initial nodes h^0 (final nodes: final_weight); sum / 2N
    final_weight: float = 1.0
    size: int = 256  # training images are resized to size x size (the code's Resize(256)); no crop
    color_jitter: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])  # brightness, contrast, saturation, hue
    hflip: bool = False  # random flip (not in the code; undone before maps are accumulated)
    max_tries: int = 1000  # partner draws before falling back to one shared class
    shuffle: bool = True  # the code: shuffle=False (its map files were named by loader index)
    accumulate: bool = True  # keep the running maximum of the localization maps in cam/accumulated/
    accumulate_from_epoch: int = 1  # the code starts at epoch 1 (skips the first epoch)
    accumulate_nodes: str = "anchor"  # anchor (code) | all (partners too)
    min_score: float = 0.1  # skip an update if sigmoid(final logit) < this (the last epoch fills empty maps)
    init_std: float = 0.01  # new convs ~ N(0, init_std)
    nesterov: bool = True
    bias_lr_mult: float = 2.0  # biases learn at 2x their group's lr (backbone 2x lr, new 20x lr)
    lr_decay_epochs: list[int] = field(default_factory=lambda: [5, 10])  # lr x lr_decay at these epochs; [] = poly
    lr_decay: float = 0.1

    def __post_init__(self) -> None:  # runs when a recipe is loaded (config._validate_selected_options)
        for key, value, allowed in (("node", self.node, ("cams", "features")), ("aggregate", self.aggregate, ("concat", "mean")),
                                    ("accumulate_nodes", self.accumulate_nodes, ("anchor", "all"))):
            if value not in allowed:
                raise ConfigError(f"cam.group.{key}: {value!r} is not one of {', '.join(allowed)}")
        if self.group_size < 1 or self.steps < 0 or self.size < 1:
            raise ConfigError(f"cam.group: group_size ({self.group_size}) and size ({self.size}) must be >= 1, "
                              f"steps ({self.steps}) >= 0")
        if len(self.color_jitter) not in (0, 4):
            raise ConfigError(f"cam.group.color_jitter: [brightness, contrast, saturation, hue] or [], got {list(self.color_jitter)}")


class GroupViews(Dataset):
    """Training images resized to a square (the code's transform): image (3, S, S) 0..255, labels (K,), id, flipped."""

    def __init__(self, base: Any, size: int, color_jitter: list[float], hflip: bool = False):
        self.base, self.size, self.hflip = base, int(size), bool(hflip)
        ops: list[Any] = [A.Resize(self.size, self.size, interpolation=cv2.INTER_LINEAR)]
        if color_jitter and any(v > 0 for v in color_jitter):
            b, c, s, h = color_jitter
            ops.append(A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=1.0))
        self.augment = A.Compose(ops, seed=0)  # loader workers reseed it (wsss.data.transforms.seed_worker)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sid = self.base.ids[i]
        s = self.base.load(sid, ("image", "labels"))
        image = self.augment(image=s["image"])["image"]
        flipped = self.hflip and bool(np.random.rand() < 0.5)
        if flipped:
            image = image[:, ::-1]
        return {"image": to_tensor_image(image), "labels": torch.from_numpy(s["labels"]), "id": sid,
                "flipped": flipped, "index": i}


def group_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, init_weight: float = 0.4,
               final_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Official loss: [w0 sum_i MLSM(GAP h_i^0) + wT sum_i MLSM(GAP h_i^T)] / 2N, averaged over the B groups.

    logits (B, N, K), labels (B*N, K). MLSM averages over the B*N images, so the sum over N nodes
    divided by 2N is (w0 * mean0 + wT * meanT) / 2.
    """
    k = labels.shape[-1]
    l0 = F.multilabel_soft_margin_loss(out["logits0"].reshape(-1, k), labels)
    lt = F.multilabel_soft_margin_loss(out["logitsT"].reshape(-1, k), labels)
    return (init_weight * l0 + final_weight * lt) / 2, {"mlsm_initial": l0.detach(), "mlsm_final": lt.detach()}


@CAM_METHODS.register("group", options=GroupOptions)
class GroupWSSS(CamMethod):
    """Group-wise semantic mining: co-attention graph over groups of images with shared labels."""

    def build_net(self, backbone: Any, num_classes: int, options: Optional[GroupOptions]) -> nn.Module:
        from wsss.models.group_graph import GraphDropout, GroupNet

        o = options or GroupOptions()
        dropout = GraphDropout(o.drop_rate, o.drop_threshold, o.dropout_at_eval) if o.graph_dropout else None
        self.group_options = o
        self._mined: Optional[dict[str, Any]] = None
        return GroupNet(backbone, num_classes - 1, o.group_size, o.steps, o.node, o.head_convs, o.head_channels,
                        o.proj_channels, o.aggregate, dropout, o.init_std)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.group_options
        if x.shape[0] % o.group_size:
            raise ValueError(f"group batch of {x.shape[0]} images is not a multiple of group_size {o.group_size}")
        out = self.net.forward_group(x)
        loss, parts = group_loss(out, batch["labels"], o.init_weight, o.final_weight)
        if o.accumulate and self.training:
            self._mined = self.mining_maps(out, batch)
        return loss, parts

    def mining_maps(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """The official localization maps relu((h^0 + h^T) / 2) (of the anchors, or all nodes), on the CPU."""
        n = self.group_options.group_size
        maps = F.relu((out["cams0"] + out["camsT"]) / 2).detach()  # (B, N, K, h, w)
        probs = torch.sigmoid(out["logitsT"]).detach()  # (B, N, K)
        keep = slice(0, 1) if self.group_options.accumulate_nodes == "anchor" else slice(None)
        ids = [sid for g in range(maps.shape[0]) for sid in list(batch["id"][g * n : (g + 1) * n])[keep]]
        flipped = batch.get("flipped")
        flipped = (flipped.view(-1, n)[:, keep].reshape(-1).cpu() if isinstance(flipped, torch.Tensor)
                   else torch.zeros(len(ids), dtype=torch.bool))
        labels = batch["labels"].view(-1, n, batch["labels"].shape[-1])[:, keep]
        maps = maps[:, keep].flatten(0, 1).float()
        maps = torch.where(flipped.to(maps.device).view(-1, 1, 1, 1), maps.flip(-1), maps)
        return {"ids": ids, "labels": labels.flatten(0, 1).cpu(), "maps": maps.cpu(), "probs": probs[:, keep].flatten(0, 1).cpu()}

    def cams(self, x: torch.Tensor, output: str = "cam") -> torch.Tensor:
        if output != "cam":
            raise ConfigError(f"cam_infer.output: {output!r} is not an output of cam.method=group (it has: cam)")
        return self.net(x)["cams"]

    @classmethod
    def train_loader(cls, dataset: Dataset, batch_size: int, num_workers: int, seed: int, options: Any = None) -> DataLoader:
        """Groups of `batch_size` anchors (each with its partners); `dataset` is the stage's ClassificationSet."""
        o = options or GroupOptions()
        base = getattr(dataset, "base", dataset)
        labels = np.stack([base.load_labels(sid) for sid in base.ids]) if len(base) else np.zeros((0, 0), np.float32)
        sampler = GroupBatchSampler(labels, o.group_size, batch_size, seed, o.shuffle, o.max_tries)
        views = GroupViews(base, o.size, list(o.color_jitter), o.hflip)
        return DataLoader(views, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0)

    def callbacks(self, out_dir: Path) -> list[L.Callback]:
        o = self.group_options
        return [MapAccumulation(Path(out_dir) / "accumulated", o.accumulate_from_epoch, o.min_score)] if o.accumulate else []

    def configure_optimizers(self) -> dict[str, Any]:
        """The official SGD: four groups (backbone/new x weights/biases), Nesterov; step decay at epochs (or poly)."""
        o, opt = self.group_options, self.optim
        new_ids = {id(p) for p in self.net.new_parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(n, b): [] for n in (False, True) for b in (False, True)}
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                groups[(id(p) in new_ids, name.endswith("bias"))].append(p)
        lr = {(n, b): opt.lr * (opt.new_layer_lr_mult if n else 1.0) * (o.bias_lr_mult if b else 1.0) for n, b in groups}
        optimizer = torch.optim.SGD([{"params": ps, "lr": lr[k]} for k, ps in groups.items() if ps], lr=opt.lr,
                                    momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=o.nesterov and opt.momentum > 0)
        if o.lr_decay_epochs:
            sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(o.lr_decay_epochs), o.lr_decay)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        sched = poly_schedule(optimizer, int(self.trainer.estimated_stepping_batches), opt.poly_power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MapAccumulation(L.Callback):
    """After every training step, folds the step's localization maps into the per-image running maximum.

    The official gate: from epoch `from_epoch` on; a class is updated only if sigmoid(final logit) >=
    min_score, except in the last epoch, where a class without a map gets one regardless. Each map is
    scaled by its own maximum first. Under DDP each process writes its own anchors (disjoint per epoch).
    """

    def __init__(self, directory: Path, from_epoch: int = 1, min_score: float = 0.1):
        self.store = AccumulatedMaps(directory)
        self.from_epoch, self.min_score = int(from_epoch), float(min_score)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mined = getattr(pl_module, "_mined", None)
        pl_module._mined = None
        epoch = int(trainer.current_epoch)
        if mined is None or epoch < self.from_epoch:
            return
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        accumulate(self.store, mined, self.min_score, last)


def accumulate(store: AccumulatedMaps, mined: dict[str, Any], min_score: float = 0.1, last_epoch: bool = False) -> None:
    """Fold mined maps ({ids, labels (M, K), maps (M, K, h, w), probs (M, K)}) into `store` (the official gate)."""
    for sid, labels, maps, probs in zip(mined["ids"], mined["labels"], mined["maps"], mined["probs"]):
        present = torch.nonzero(labels > 0.5).flatten().tolist()
        if not present:
            continue
        existing = set(store.read(sid)) if last_epoch else set()
        new = {}
        for k in present:
            if float(probs[k]) < min_score and not (last_epoch and k + 1 not in existing):
                continue
            m = maps[k].numpy()
            new[k + 1] = m / (m.max() + 1e-8)  # label index k + 1: background is 0
        store.update(sid, new)
