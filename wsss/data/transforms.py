"""Training and inference transforms (albumentations) and the torch data sets the trainers consume."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from wsss.data.base import IGNORE, SegDataset
from wsss.errors import DataError
from wsss.io import images


def train_augment(cfg: Any, with_masks: bool, seed: int = 0) -> A.Compose:
    """Random rescale, pad, random crop, flip, optional colour jitter (no normalisation: done on tensors).

    Seeded: albumentations draws from its own generators, not numpy's, so an unseeded pipeline differs
    on every run. Loader workers reseed it from their torch seed (`seed_worker`), so each worker draws
    its own stream, the same in every run.
    """
    lo, hi = cfg.scale_range
    ops: list[Any] = []
    if (lo, hi) != (1.0, 1.0):
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                                 mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    ops += [
        A.PadIfNeeded(cfg.crop_size, cfg.crop_size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=IGNORE),
        A.RandomCrop(cfg.crop_size, cfg.crop_size),
    ]
    if cfg.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.1, j / 3), p=0.8))
    return A.Compose(ops, seed=seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: Lightning's per-worker numpy/random/torch seeding, plus the data set's
    albumentations pipeline (`.augment`) reseeded from this worker's torch seed."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    augment = getattr(info.dataset if info is not None else None, "augment", None)
    if hasattr(augment, "set_random_seed"):
        augment.set_random_seed(torch.initial_seed() % 2**32)


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in 0..255 (normalisation happens on the device)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


class Normalizer(torch.nn.Module):
    """Maps 0..255 RGB tensors to the backbone's normalised input on whatever device they live."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) 0..255 -> normalised."""
        return (x - self.mean) / self.std


class ClassificationSet(Dataset):
    """Image-level training samples: augmented image (3, S, S) 0..255 and multi-hot labels (K,)."""

    def __init__(self, base: SegDataset, augment: Callable):
        self.base, self.augment = base, augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.base.load(self.base.ids[i], ("image", "labels"))
        out = self.augment(image=s["image"])
        return {"image": to_tensor_image(out["image"]), "labels": torch.from_numpy(s["labels"]), "index": i}


class SegmentationSet(Dataset):
    """Segmentation training samples with a target from GT masks, pseudo masks or scribbles
    (source "image": no pixel labels, target all 255, for single-stage methods that learn from `labels`).

    Returns image (3, S, S) 0..255, target (S, S) int64 with 255 = ignore, roi (S, S) bool
    (False on padding: the regularised losses must not see it) and labels (K,).
    """

    def __init__(self, base: SegDataset, source: str, augment: Callable, pseudo_dir: Optional[Path] = None):
        if source == "pseudo" and pseudo_dir is None:
            raise ValueError("pseudo_dir is required for source='pseudo'")
        if source == "gt" and not base.has_masks:
            raise DataError(None, "seg.labels=gt needs ground-truth masks, and this data set has none")
        if source == "scribble" and not base.has_scribbles:
            raise DataError(None, "seg.labels=scribble needs scribbles: set data.scribble_dir, or "
                                  "data.scribbles.source=simulate to simulate them from masks")
        self.base, self.source, self.augment, self.pseudo_dir = base, source, augment, pseudo_dir

    def __len__(self) -> int:
        return len(self.base)

    def target(self, sample_id: str, hw: tuple[int, int]) -> np.ndarray:
        """The training target of one image, (H, W) uint8."""
        if self.source == "image":
            return np.full(hw, IGNORE, np.uint8)
        if self.source == "gt":
            return self.base.load_mask(sample_id, hw)
        if self.source == "scribble":
            return self.base.load_scribble(sample_id, hw)
        path = self.pseudo_dir / f"{sample_id}.png"
        if not path.is_file():
            raise DataError(path, "pseudo mask missing; run the pseudo stage first")
        return images.read_index_png(path, self.base.num_classes, hw, "pseudo mask")

    def __getitem__(self, i: int) -> dict[str, Any]:
        sid = self.base.ids[i]
        s = self.base.load(sid, ("image", "labels"))
        target = self.target(sid, s["image"].shape[:2])
        roi = np.ones(target.shape, np.uint8)
        out = self.augment(image=s["image"], masks=[target, roi])
        target, roi = out["masks"]
        return {
            "image": to_tensor_image(out["image"]),
            "target": torch.from_numpy(np.ascontiguousarray(target)).long(),
            "roi": torch.from_numpy(np.ascontiguousarray(roi) == 1),  # padding was filled with 255
            "labels": torch.from_numpy(s["labels"]),
            "index": i,
        }


class InferenceSet(Dataset):
    """Whole images for inference: image (H, W, 3) uint8 plus the requested parts of the sample."""

    def __init__(self, base: SegDataset, ids: list[str], parts: tuple[str, ...] = ("image", "labels")):
        self.base, self.ids, self.parts = base, ids, parts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self.base.load(self.ids[i], self.parts))


def collate_list(batch: list[dict]) -> list[dict]:
    """Inference batches stay lists (images differ in size)."""
    return batch
