"""Trained weights as `model.safetensors` + `model.json`; loading checks they fit the recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from wsss.errors import CheckpointError
from wsss.io import atomic
from wsss.models.backbones import load_matching


def export_net(net: torch.nn.Module, directory: Path, kind: str, section: Any, class_names: list[str]) -> Path:
    """Write the network's weights and a description of what built it; return the weights path."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    path = directory / "model.safetensors"
    with atomic.atomic_path(path) as tmp:
        save_file(state, str(tmp))
    meta = {"kind": kind, "class_names": list(class_names),
            "config": OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section}
    atomic.write_json(directory / "model.json", meta)
    return path


def load_weights(net: torch.nn.Module, directory: Path, kind: str, class_names: list[str]) -> torch.nn.Module:
    """Load `directory/model.safetensors` into `net`, with clear errors for a mismatched recipe."""
    path = directory / "model.safetensors"
    meta_path = directory / "model.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: trained weights not found; run the training stage first")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != kind:
            raise CheckpointError(f"{path}: holds a {meta.get('kind')} network, expected {kind}")
        if meta.get("class_names") and meta["class_names"] != list(class_names):
            raise CheckpointError(f"{path}: trained for classes {meta['class_names'][:5]}... "
                                  f"({len(meta['class_names'])}), this data set has {len(class_names)}")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable weights file ({e})") from None
    load_matching(net, state, str(path))
    return net
