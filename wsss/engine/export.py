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
    trained: list[str] = []
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{meta_path}: not a valid model description (a JSON object)")
        if meta.get("kind") != kind:
            raise CheckpointError(f"{path}: holds a {meta.get('kind')} network, expected {kind}")
        trained = list(meta.get("class_names") or [])
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable weights file ({e})") from None
    classes = "" if not trained or trained == list(class_names) else (
        f"trained for {len(trained)} classes ({', '.join(trained[:4])}, ...), this data set has {len(class_names)} "
        f"({', '.join(class_names[:4])}, ...)")
    try:
        load_matching(net, state, str(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e}{'; ' + classes if classes else ''}") from None
    if classes:  # same shapes, other class names: the weights load but would mean other things
        raise CheckpointError(f"{path}: {classes}")
    return net


def load_shared_weights(net: torch.nn.Module, directory: Path) -> int:
    """Start `net` from `directory/model.safetensors` where names and shapes agree (a warm start from a
    related network, e.g. the CAM network's backbone); returns how many tensors were loaded."""
    path = directory / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: weights to start from not found")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable weights file ({e})") from None
    own = net.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not shared:
        raise CheckpointError(f"{path}: no tensor fits this network (another backbone?)")
    net.load_state_dict(shared, strict=False)
    return len(shared)
