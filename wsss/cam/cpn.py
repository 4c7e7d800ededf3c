"""CAM method `cpn`: Complementary Patch Network (Zhang et al., ICCV 2021; official code Ferenas/CPN).

A triplet network on SEAM's CAM network (PCM) + the Pixel-Region Correlation Module: every crop is
seen whole and as a complementary pair (wsss/cam/patches.py, added to batches by `train_loader`), and
trained with the official losses (wsss/losses/cpn.py). Inference is SEAM's: `cams(x, "cam_rv")` is
the refined map; the cam stage does multi-scale + flip (the code's scales 0.5, 1, 1.5, 2).
Recipe section `cam.cpn` (CPNOptions); docs/methods/cpn.md maps paper terms to keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsss.cam.methods import Seam
from wsss.engine.trainer import train_loader
from wsss.errors import ConfigError
from wsss.registry import CAM_METHODS

__all__ = ["CPN", "CPNOptions"]


@dataclass
class CPNOptions:
    """`cam.cpn`: complementary patch pairs, PRCM and the loss weights (defaults: the official code)."""

    pair: bool = True  # train on the complementary pair (False: the original view only, the ablation baseline)
    prcm: bool = True  # Pixel-Region Correlation Module on top of PCM
    prcm_keys: str = "view"  # view (official code's reshape) | transpose (the paper's one key per class)
    dropout: float = 0.5  # Dropout2d before the classifier (official ResNet-38 dropout7)
    strategy: str = "superpixel"  # superpixel (hide_patch_ss, the code's default) | grid (hide_patch)
    n_segments: int = 300  # SLIC superpixels per crop
    compactness: float = 10.0  # SLIC compactness
    hide_fraction: float = 0.5  # ids drawn = floor(hide_fraction * (max_id + 1))
    replacement: bool = True  # the code draws ids with replacement (~39% hidden); False: exactly the fraction
    grid_sizes: list[int] = field(default_factory=lambda: [224, 448])  # grid strategy: cell sizes in pixels
    hide_prob: float = 0.5  # grid strategy: probability of hiding a cell
    amp_weight: float = 1.0  # adaptive min pooling on cam_rv (the code adds the mean of the 3 views)
    tcp_weight: float = 1.0  # complementary patch consistency (L_tcp)
    cpcr_weight: float = 1.0  # complementary cross regularisation with OHEM (L_cpcr)
    cpcr_topk: float = 0.2  # OHEM fraction

    def __post_init__(self) -> None:  # runs when a recipe is loaded (config._validate_selected_options)
        if self.prcm_keys not in ("view", "transpose"):
            raise ConfigError(f"cam.cpn.prcm_keys: {self.prcm_keys!r} is not one of view, transpose")
        if self.strategy not in ("superpixel", "grid"):
            raise ConfigError(f"cam.cpn.strategy: {self.strategy!r} is not one of superpixel, grid")
        if not 0 < self.cpcr_topk <= 1 or not 0 < self.hide_fraction < 1:
            raise ConfigError("cam.cpn: cpcr_topk must be in (0, 1] and hide_fraction in (0, 1)")
        if self.strategy == "grid" and (not self.grid_sizes or min(self.grid_sizes) < 1):
            raise ConfigError("cam.cpn.grid_sizes: needs at least one positive cell size")


@CAM_METHODS.register("cpn", options=CPNOptions)
class CPN(Seam):
    """CPN: SEAM's network + PRCM, trained as a triplet (crop + complementary pair); `cam_rv` is the refined map."""

    def build_net(self, backbone: Any, num_classes: int, options: Optional[CPNOptions]) -> nn.Module:
        from wsss.models.cpn import CPNCAMNet

        o = options or CPNOptions()
        return CPNCAMNet(backbone, num_classes, prcm=o.prcm, prcm_keys=o.prcm_keys, dropout=o.dropout)

    def loss(self, x: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from wsss.losses.cpn import cpn_loss

        o = self.options or CPNOptions()
        if o.pair and "cp_mask" not in batch:
            raise ValueError("cpn: the batch has no cp_mask; build the loader with CPN.train_loader")
        return cpn_loss(self.net, x, batch["labels"], batch.get("cp_mask"), batch.get("cp_kept"), o)

    def cams(self, x: torch.Tensor, output: str = "cam_rv") -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> foreground maps (N, C - 1, h, w): "cam_rv" (refined) or raw "cam"."""
        if output not in ("cam", "cam_rv"):
            raise ConfigError(f"cam_infer.output: {output!r} is not an output of cam.method=cpn (it has: cam, cam_rv)")
        return self.net.infer_cams(x, output)

    @classmethod
    def train_loader(cls, dataset: Dataset, batch_size: int, num_workers: int, seed: int,
                     options: Any = None) -> DataLoader:
        """The default shuffled, DDP-aware loader over samples that carry a complementary patch mask."""
        from wsss.cam.patches import ComplementaryPairSet

        o = options or CPNOptions()
        return train_loader(ComplementaryPairSet(dataset, o) if o.pair else dataset, batch_size, num_workers, seed)
