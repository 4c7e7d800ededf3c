"""Segmentation method `auxsegnet` (seg.method): AuxSegNet's network, its five-term loss and inference
from the refined segmentation head, plus the training data it needs (labels, saliency pseudo-label).

The options section `seg.auxsegnet` also holds the settings of the stage `auxseg_rounds` (rounds,
warm starts, the saliency update), so one section describes the whole method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsss.config import CRFConfig
from wsss.data.transforms import SegmentationSet, to_tensor_image
from wsss.engine.modules import SegMethod
from wsss.engine.trainer import train_loader
from wsss.errors import ConfigError, DataError
from wsss.io.images import IGNORE, read_saliency
from wsss.registry import SEG_METHODS

log = logging.getLogger("wsss")

SALIENCY_SUBDIR = "saliency"  # a round's saliency pseudo-labels live in <labels dir>/saliency/<id>.png


@dataclass
class AuxSegNetOptions:
    """seg.auxsegnet: the network, the loss and the iterative label updates (stage auxseg_rounds)."""

    channels: int = 128  # width of the saliency and segmentation branches (official 128)
    rates: list[int] = field(default_factory=lambda: [6, 12, 18])  # dilations of the branch convs (official)
    saliency_task: bool = True  # the auxiliary saliency branch and its losses (ablation: false)
    cross_affinity: bool = True  # refine predictions by the (cross-task) affinity (ablation: false)
    renormalize_cross: bool = True  # rows of the fused affinity sum to 1 (official: false, see docs)
    dropout: float = 0.5  # Dropout2d before the classifier's pooling (official dropout7)
    cls_weight: float = 1.0  # official --cls_loss_weight
    sal_weight: float = 1.0  # official --sal_loss_weight (initial and refined saliency)
    seg_weight: float = 1.0  # official --seg_loss_weight (initial and refined segmentation)
    sal_target_threshold: float = 0.5  # the saliency pseudo-label is binarised at this value (official 0.5)
    pad_as_background: bool = False  # official quirk: crop padding is label 0 / saliency 0, not ignored
    # stage auxseg_rounds
    rounds: int = 4  # train -> update labels, this many times (official main.py --num_steps 4)
    init_from_cam: bool = True  # round 1 starts from the trained CAM network (official --init_weights)
    warm_start: bool = True  # round k > 1 starts from round k-1's network (official main.py)
    update_after_last: bool = True  # also update labels after the last round (official; reported only)
    update_labels: bool = True  # false: every round trains on the initial labels (a control: the rounds' training alone)
    saliency_from: str = "initial"  # fuse the network's saliency with: initial | previous round's map
    sal_crf: CRFConfig = field(default_factory=lambda: CRFConfig(preset="auxsegnet_sal"))
    sal_crf_tau: float = 1.05  # crf_for_sal's unary temperature

    def __post_init__(self) -> None:
        if len(self.rates) != 3 or any(r < 1 for r in self.rates):
            raise ConfigError(f"seg.auxsegnet.rates: three dilations >= 1, got {list(self.rates)}")
        if self.saliency_from not in ("initial", "previous"):
            raise ConfigError(f"seg.auxsegnet.saliency_from: {self.saliency_from!r} is not one of initial, previous")
        if self.rounds < 1:
            raise ConfigError("seg.auxsegnet.rounds: must be >= 1")


class AuxSegSet(Dataset):
    """SegmentationSet samples plus the saliency pseudo-label: adds `saliency` (S, S) float {0, 1}
    and `sal_valid` (S, S) bool. The saliency comes from `<pseudo dir>/saliency/` when that exists
    (a round's updated maps), else from the data set (`ds.load_saliency`: initial maps)."""

    def __init__(self, seg_set: SegmentationSet, sal_threshold: float = 0.5, pad_as_background: bool = False):
        self.seg_set, self.base = seg_set, seg_set.base
        self.sal_threshold, self.pad_as_background = sal_threshold, pad_as_background
        pdir = seg_set.pseudo_dir
        self.sal_dir = Path(pdir) / SALIENCY_SUBDIR if pdir is not None and (Path(pdir) / SALIENCY_SUBDIR).is_dir() else None
        if self.sal_dir is None and not self.base.has_saliency:
            raise DataError(None, "seg.method=auxsegnet needs saliency maps: set data.saliency_dir (or use a data set "
                                  "that has them)")

    def __len__(self) -> int:
        return len(self.seg_set)

    def saliency(self, sid: str, hw: tuple[int, int]) -> np.ndarray:
        """(H, W) float32 in [0, 1]."""
        if self.sal_dir is not None:
            return read_saliency(self.sal_dir / f"{sid}.png", hw, self.base.max_pixels)
        return self.base.load_saliency(sid, hw)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sid = self.base.ids[i]
        s = self.base.load(sid, ("image", "labels"))
        hw = s["image"].shape[:2]
        target = self.seg_set.target(sid, hw)
        sal = (self.saliency(sid, hw) > self.sal_threshold).astype(np.uint8)  # binarised before the resize
        roi = np.ones(hw, np.uint8)
        out = self.seg_set.augment(image=s["image"], masks=[target, roi, sal])
        target, roi, sal = (np.ascontiguousarray(m) for m in out["masks"])
        valid = roi == 1  # padding was filled with 255
        if self.pad_as_background:  # official get_data_from_chunk: zero-padded label and saliency
            target = np.where(valid, target, 0)
            valid = np.ones_like(valid)
        return {"image": to_tensor_image(out["image"]), "target": torch.from_numpy(target).long(),
                "roi": torch.from_numpy(roi == 1), "labels": torch.from_numpy(s["labels"]), "index": i,
                "saliency": torch.from_numpy(np.where(roi == 1, sal, 0).astype(np.float32)),
                "sal_valid": torch.from_numpy(valid)}


@SEG_METHODS.register("auxsegnet", options=AuxSegNetOptions)
class AuxSegNet(SegMethod):
    """AuxSegNet: classification + saliency + segmentation with cross-task affinity; infers from the refined head."""

    # Inference on the image as it is (official infer_AuxAff.py): padded positions would take part in
    # every non-local affinity (a 48 px image padded to 64 is 44 % padding at OS 8). timm takes any size.
    pad_multiple = 1

    def build_net(self, seg: Any, num_classes: int, options: Optional[AuxSegNetOptions]) -> nn.Module:
        from wsss.models.auxsegnet import AuxSegNetwork

        o = options or AuxSegNetOptions()
        return AuxSegNetwork(seg.encoder, num_classes, o.channels, tuple(o.rates), o.saliency_task, o.cross_affinity,
                             o.renormalize_cross, o.dropout)

    @classmethod
    def train_loader(cls, dataset: Dataset, batch_size: int, num_workers: int, seed: int, options: Any = None) -> DataLoader:
        """Shuffled batches of AuxSegSet samples (the segmentation set plus the saliency pseudo-label)."""
        o = options or AuxSegNetOptions()
        return train_loader(AuxSegSet(dataset, o.sal_target_threshold, o.pad_as_background), batch_size, num_workers, seed)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """cls MLSM + BCE(initial, refined saliency) + CE(initial, refined segmentation), upsampled to the crop."""
        o = self.options or AuxSegNetOptions()
        out = self.net(x)
        size = x.shape[-2:]
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        target = batch["target"]
        parts = {"cls_loss": F.multilabel_soft_margin_loss(out["cls"], batch["labels"].float())}
        parts["init_seg_loss"] = F.cross_entropy(up(out["init_seg"]), target, ignore_index=IGNORE)
        loss = o.cls_weight * parts["cls_loss"] + o.seg_weight * parts["init_seg_loss"]
        if o.cross_affinity:
            parts["seg_loss"] = F.cross_entropy(up(out["seg"]), target, ignore_index=IGNORE)
            loss = loss + o.seg_weight * parts["seg_loss"]
        if "init_sal" in out:
            sal, valid = batch["saliency"][:, None], batch["sal_valid"][:, None].float()
            heads = ("init_sal", "sal") if o.cross_affinity else ("init_sal",)
            for name in heads:
                bce = F.binary_cross_entropy_with_logits(up(out[name]), sal, reduction="none")
                parts[f"{name}_loss"] = (bce * valid).sum() / valid.sum().clamp_min(1.0)
                loss = loss + o.sal_weight * parts[f"{name}_loss"]
        return loss, {k: v.detach() for k, v in parts.items()}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> the refined segmentation head's logits (N, C, H, W)."""
        return self.net(x)["logits"]

    @torch.inference_mode()
    def update_maps(self, x: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        """One normalised image (1, 3, H, W) -> what a label update needs, at (H, W):
        cams (K, H, W) = A_cross x max-normalised ReLU CAMs, saliency (H, W) = sigmoid(refined saliency)
        or None without the saliency task (official step/gen_pgt.py)."""
        out = self.net(x, with_affinity=True)
        size = x.shape[-2:]
        cams = F.relu(out["cams"].float())
        cams = cams / (cams.amax((2, 3), keepdim=True) + 1e-5)
        if out["affinity"] is not None:
            cams = propagate_maps(out["affinity"], cams)
        cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)[0]
        sal = None
        if "sal" in out:
            sal = torch.sigmoid(F.interpolate(out["sal"].float(), size=size, mode="bilinear", align_corners=False))[0, 0]
        return {"cams": cams, "saliency": sal}


def propagate_maps(affinity: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """wsss.models.auxsegnet.propagate, imported lazily (the model module imports timm)."""
    from wsss.models.auxsegnet import propagate

    return propagate(affinity, maps)
