"""The stage table and the runner: every stage declared once, `wsss run` and `wsss demo`.

A stage is a module with `run(rd: RunDir) -> dict` (one readable file in `wsss/stages/`, runnable
alone as `python -m wsss.stages.<name> RECIPE`). Its entry here says what the CLI, the recipe
validation and the run directory need to know: its command and help, the recipe keys its outputs
depend on, the stages it reads from, and what it writes. A plug-in adds a stage with
`register_stage(Stage(...))`. This module stays light (no torch import) so `wsss --help` is instant.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from wsss.registry import STAGES

log = logging.getLogger("wsss")

Upstream = Union[tuple[str, ...], Callable[[Any], tuple[str, ...]]]


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what it is called, what it reads and what it writes."""

    name: str  # the name in run.stages and manifest.json
    module: str  # defines run(rd) -> dict
    help: str  # one line for `wsss --help`
    reads: tuple[str, ...] = ()  # recipe keys its outputs depend on (hashed)
    after: Upstream = ()  # stages whose outputs it reads; a function of the recipe when that depends on it
    outputs: tuple[str, ...] = ()  # entries of the run directory it writes
    command: str = ""  # CLI subcommand ("" = name with '-' for '_')
    default: bool = False  # part of the default run.stages
    model: Optional[Callable[[Any], Optional[str]]] = None  # the segmenter dir it leaves (evaluation uses the last)
    grows: tuple[str, ...] = ()  # keys of `reads` that only add outputs (rounds): changing them keeps what is made

    @property
    def cli(self) -> str:
        return self.command or self.name.replace("_", "-")

    def upstream(self, cfg: Any) -> tuple[str, ...]:
        """The stages this one reads from, for this recipe."""
        return tuple(self.after(cfg)) if callable(self.after) else tuple(self.after)

    def run(self, rd: Any) -> dict:
        return importlib.import_module(self.module).run(rd)


def register_stage(stage: Stage) -> Stage:
    """Add a stage to the table (plug-ins too); `run.stages` may then name it."""
    STAGES.add(stage.name, stage)
    return stage


def stage(name: str) -> Stage:
    """The stage called `name` (ConfigError listing the stages otherwise)."""
    return STAGES.get(name)


def default_stages() -> list[str]:
    """The stages a recipe runs when it does not set run.stages."""
    return [s.name for _, s in STAGES.items() if s.default]


def model_stages(cfg: Any) -> tuple[str, ...]:
    """The stages of this run that leave a segmenter, in run order."""
    return tuple(s for s in cfg.run.stages if s in STAGES and STAGES.get(s).model is not None
                 and STAGES.get(s).model(cfg) is not None)


def final_model_dir(rd: Any) -> Path:
    """The segmenter that evaluation and prediction use: the one left by the last stage that makes one."""
    names = model_stages(rd.cfg)
    if not names:
        return rd.sub("seg")
    return rd.sub(STAGES.get(names[-1]).model(rd.cfg))


def _seg_upstream(cfg: Any) -> tuple[str, ...]:
    # trained on GT masks or scribbles: no pseudo-mask stage involved; a method may read the run's saliency
    return ("pseudo", "saliency") if cfg.seg.labels == "pseudo" else ("saliency",)


def _cams_upstream(cfg: Any) -> tuple[str, ...]:
    # whichever stages of this run write cams/ (cam, or accumulated_cams for methods that accumulate maps),
    # and the run's saliency maps (generators may read them)
    return tuple(s for s in cfg.run.stages if s in STAGES and {"cams", "saliency"} & set(STAGES.get(s).outputs))


def _cyclic_model(cfg: Any) -> Optional[str]:
    return f"seg_r{cfg.cyclic.rounds}" if cfg.cyclic.rounds > 0 else None


for _stage in (
    Stage("saliency", "wsss.stages.saliency", "saliency maps of the train split (bundled network, a folder, or the data set's)",
          reads=("saliency", "data.dataset", "data.root", "data.train_split", "data.max_images", "data.saliency_dir",
                 "data.shapes", "data.skip_bad"), outputs=("saliency",)),
    Stage("train_cam", "wsss.stages.train_cam", "train the CAM network on image-level labels (cam.method)",
          reads=("data", "cam", "trainer.seed"), outputs=("cam",), default=True),
    Stage("cam", "wsss.stages.cam", "multi-scale + flip CAM inference, one cams/<id>.npz per image",
          reads=("cam_infer", "data.dataset", "data.root", "data.train_split", "data.max_images"), after=("train_cam",),
          outputs=("cams",), default=True),
    Stage("accumulated_cams", "wsss.stages.accumulated_cams",
          "cams/<id>.npz from the maps a CAM method accumulated during training (cam.method=group); replaces cam",
          reads=("data.dataset", "data.root", "data.train_split", "data.max_images", "cam_infer.split"),
          after=("train_cam",), outputs=("cams",)),
    Stage("pseudo", "wsss.stages.pseudo", "pseudo masks from CAMs (pseudo.method) and their quality",
          reads=("pseudo",), after=_cams_upstream, outputs=("pseudo",), default=True),
    Stage("train_seg", "wsss.stages.train_seg", "train the segmenter (seg.method) on pseudo masks, GT or scribbles",
          reads=("seg", "data", "trainer.seed"), after=_seg_upstream, outputs=("seg",), default=True,
          model=lambda cfg: "seg"),
    Stage("cyclic", "wsss.stages.cyclic", "cyclic pseudo-mask rounds (PMM): predict train, retrain a fresh segmenter",
          reads=("cyclic", "seg"), after=("train_seg",), outputs=("pseudo_r*", "seg_r*"), model=_cyclic_model,
          grows=("cyclic.rounds",)),
    Stage("auxseg_rounds", "wsss.stages.auxseg_rounds", "AuxSegNet rounds: train, then update labels and saliency "
          "with the cross-task affinity", reads=("seg", "pseudo", "data", "trainer.seed"), after=("pseudo", "saliency"),
          outputs=("pseudo_r*", "seg_r*"), model=lambda cfg: f"seg_r{cfg.seg.auxsegnet.rounds}",
          grows=("seg.auxsegnet.rounds",)),
    Stage("evaluate", "wsss.stages.evaluate", "score the segmenter on a split (or any --pred/--gt folders)",
          reads=("eval",), after=model_stages, outputs=("pred", "metrics/evaluate.json"), default=True),
    Stage("report", "wsss.stages.report", "write the run's HTML report (tables, CAMs, overlays, curves)",
          reads=("report",), after=("evaluate",), outputs=("report",), default=True),
):
    register_stage(_stage)


# ---- the runner --------------------------------------------------------------------------------

def open_run(recipe: Optional[str], overrides: Sequence[str] = (), force: bool = False):
    """Resolve the recipe (plug-ins included) and prepare its run directory."""
    from wsss.config import load_recipe
    from wsss.engine import dist
    from wsss.engine.rundir import RunDir

    cfg = load_recipe(recipe, list(overrides))
    dist.init()
    return RunDir(cfg, force=force).prepare()


def run_stages(rd: Any, stages: Optional[Sequence[str]] = None) -> Any:
    """Run `stages` (default: the recipe's run.stages) in order; finished ones skip themselves."""
    names = list(stages) if stages else list(rd.cfg.run.stages)
    for name in names:
        stage(name)  # unknown names fail before any work
    log.info("run %s -> %s (stages: %s)", rd.cfg.run.name, rd.path, ", ".join(names))
    for name in names:
        stage(name).run(rd)
    return rd


def print_summary(rd: Any) -> None:
    """The headline numbers of a run, from its manifest."""
    from wsss.engine import dist

    if not dist.is_main():
        return
    stages = rd.read_manifest().get("stages", {})
    lines = [f"run {rd.cfg.run.name}: {rd.path}"]
    p = stages.get("pseudo", {}).get("metrics", {})
    if "cam_seed_miou" in p:
        lines.append(f"  CAM seed mIoU (train, best bg threshold {p['cam_seed_best_threshold']:.2f}): {100 * p['cam_seed_miou']:.2f}")
    if "pseudo_miou" in p:
        lines.append(f"  pseudo-mask mIoU (train): {100 * p['pseudo_miou']:.2f}  ({100 * p['labelled_fraction']:.1f}% pixels labelled)")
    for name, info in stages.items():  # per-round mask quality of iterative stages (cyclic, ...)
        for k, v in sorted(info.get("metrics", {}).items()):
            if name != "pseudo" and k.endswith("pseudo_miou") and isinstance(v, (int, float)):
                lines.append(f"  {name} {k.replace('_', ' ')} (train): {100 * v:.2f}")
    e = stages.get("evaluate", {}).get("metrics", {})
    if "miou" in e:
        lines.append(f"  segmenter mIoU ({e.get('split')}, {e.get('protocol')}): {100 * e['miou']:.2f}")
    r = stages.get("report", {}).get("metrics", {})
    if "path" in r:
        lines.append(f"  report: {r['path']}")
    print("\n".join(lines), flush=True)


def run_demo(overrides: Sequence[str], force: bool = False) -> None:
    """The README's main job: the image-level pipeline on the synthetic set, next to full supervision."""
    from wsss.config import CONFIG_DIR

    start = time.time()
    full = run_stages(open_run(str(CONFIG_DIR / "shapes_full.yaml"), list(overrides), force))
    weak = run_stages(open_run(str(CONFIG_DIR / "shapes_cam.yaml"), [*overrides, f"report.compare_run={full.path}"], force))
    f = full.metrics("evaluate").get("miou")
    p = weak.metrics("pseudo")
    w = weak.metrics("evaluate").get("miou")
    print()
    print_summary(full)
    print_summary(weak)
    print(f"\nshapes demo ({time.time() - start:.0f} s):")
    print(f"  CAM seed mIoU (train):            {100 * p.get('cam_seed_miou', float('nan')):.2f}")
    print(f"  pseudo-mask mIoU (train):         {100 * p.get('pseudo_miou', float('nan')):.2f}")
    print(f"  segmenter val mIoU, image labels: {100 * w:.2f}")
    print(f"  segmenter val mIoU, full masks:   {100 * f:.2f}")
    print(f"  weak / full:                      {w / f:.2f}")
    print(f"  report: {weak.sub('report', 'index.html')}")
