"""Run directories: the resolved config, a manifest per run, stage skipping and resumption.

runs/<name>/
  config.yaml        the fully resolved recipe, as run
  manifest.json      per stage: status, config hash, start/end, seconds, metrics; package versions
  <stage outputs>    cams/, pseudo/, seg/, pred/, metrics/, report/ ...

A stage is skipped when the manifest says it finished with the same config hash and its outputs
exist. When the hash changed, the previous outputs are moved to `<dir>.old` (one generation kept)
before the stage runs again, so stale and new files never mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from wsss.config import section_hash, to_yaml
from wsss.engine import dist
from wsss.errors import ConfigError, RunDirError
from wsss.io import atomic
from wsss.registry import STAGES

log = logging.getLogger(__name__)

def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("wsss", "torch", "torchvision", "timm", "segmentation_models_pytorch", "lightning", "numpy",
                "albumentations", "torchmetrics", "omegaconf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


class RunDir:
    """A run directory bound to one resolved recipe."""

    def __init__(self, cfg: DictConfig, force: bool = False):
        self.cfg = cfg
        self.path = run_path(cfg.run.root, cfg.run.name)
        self.force = force
        self.manifest_path = self.path / "manifest.json"
        self._hashes: dict[str, str] = {}

    # ---- layout ----------------------------------------------------------------------------
    def sub(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def prepare(self) -> "RunDir":
        """Create the directory, check it is writable, save the resolved config, init the manifest."""
        if dist.is_main():
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / f"{atomic.TMP_PREFIX}probe"
                probe.write_bytes(b"ok")
                probe.unlink()
            except OSError as e:
                raise RunDirError(f"{self.path}: run directory is not writable ({e.strerror or e}); "
                                  "choose another with run.root=...") from None
            removed = atomic.clean_temporaries(self.path)
            if removed:
                log.info("removed %d half-written temporary file(s) left by an interrupted run", removed)
            atomic.write_text(self.path / "config.yaml", to_yaml(self.cfg))
            manifest = self.read_manifest()
            manifest.setdefault("name", self.cfg.run.name)
            manifest.setdefault("created", _now())
            manifest["versions"] = package_versions()
            manifest["config_hash"] = section_hash(self.cfg, list(self.cfg.keys()))
            manifest.setdefault("stages", {})
            self.write_manifest(manifest)
        dist.barrier()
        return self

    # ---- manifest --------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.manifest_path}: corrupt manifest ({e}); delete it to start the run afresh") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        if dist.is_main():
            atomic.write_json(self.manifest_path, manifest)

    def update_stage(self, stage: str, **fields: Any) -> None:
        if not dist.is_main():
            return
        manifest = self.read_manifest()
        manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        self.write_manifest(manifest)

    def stage_info(self, stage: str) -> dict[str, Any]:
        return self.read_manifest().get("stages", {}).get(stage, {})

    def metrics(self, stage: str) -> dict[str, Any]:
        return self.stage_info(stage).get("metrics", {})

    # ---- hashing and skipping --------------------------------------------------------------
    def stage_hash(self, stage: str) -> str:
        """Hash of what the stage's outputs depend on (its config sections and upstream hashes)."""
        if stage not in self._hashes:
            self._hashes[stage] = self._hash(stage)
        return self._hashes[stage]

    def outputs_hash(self, stage: str) -> str:
        """The stage hash without the keys that only add outputs (`Stage.grows`, e.g. rounds): while it
        holds, what the stage made stays valid and a longer run extends it."""
        grows = STAGES.get(stage).grows
        return self._hash(stage, leave_out=grows) if grows else self.stage_hash(stage)

    def _hash(self, stage: str, leave_out: tuple[str, ...] = ()) -> str:
        entry = STAGES.get(stage)  # what the stage table says its outputs depend on
        upstream = tuple(u for u in entry.upstream(self.cfg) if u in self.cfg.run.stages and u != stage)
        parts = [section_hash(self.cfg, list(entry.reads), leave_out=leave_out)] + [self.stage_hash(u) for u in upstream]
        return section_hash_text("|".join(parts))

    def is_done(self, stage: str, outputs: list[Path] | tuple[Path, ...] = ()) -> bool:
        info = self.stage_info(stage)
        return (not self.force and info.get("status") == "done" and info.get("config_hash") == self.stage_hash(stage)
                and all(Path(p).exists() for p in outputs))

    def reset_outputs_if_stale(self, stage: str, dirs: list[Path] | tuple[Path, ...]) -> None:
        """If the stage ran before with another config (or --force), or its folders hold another stage's
        outputs (two stages can write cams/), move them to `<dir>.old`."""
        info = self.stage_info(stage)
        recorded, current = ("outputs_hash", self.outputs_hash(stage)) if "outputs_hash" in info else \
            ("config_hash", self.stage_hash(stage))
        stale = info.get(recorded) not in (None, current) or self.force
        if info.get("config_hash") is None and not stale:
            stale = bool(self._written_by_other(stage, dirs))
        if not stale or not dist.is_main():
            dist.barrier()
            return
        for d in dirs:
            d = Path(d)
            if d.exists():
                old = d.with_name(d.name + ".old")
                if old.exists():
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
                os.replace(d, old)
                log.info("%s: config changed, previous outputs moved to %s", stage, old)
        dist.barrier()

    def _written_by_other(self, stage: str, dirs: list[Path] | tuple[Path, ...]) -> list[str]:
        """Other stages recorded in the manifest that declare one of `dirs` (existing) as their output."""
        names = {Path(d).name for d in dirs if Path(d).exists()}
        return [other for other, info in self.read_manifest().get("stages", {}).items()
                if other != stage and other in STAGES and info.get("config_hash") is not None
                and names & set(STAGES.get(other).outputs)]

    @contextlib.contextmanager
    def running(self, stage: str) -> Iterator[dict[str, Any]]:
        """Record a stage's status and timing; the yielded dict collects its metrics."""
        metrics: dict[str, Any] = {}
        start = time.time()
        hashes = {"config_hash": self.stage_hash(stage)}
        if STAGES.get(stage).grows:
            hashes["outputs_hash"] = self.outputs_hash(stage)
        self.update_stage(stage, status="running", started=_now(), **hashes)
        try:
            yield metrics
        except KeyboardInterrupt:
            with contextlib.suppress(RunDirError):  # a full disk must not hide the interruption
                self.update_stage(stage, status="interrupted", seconds=round(time.time() - start, 2))
            raise
        except BaseException as e:
            with contextlib.suppress(RunDirError):  # e.g. the disk is full: report the original error
                self.update_stage(stage, status="failed", error=str(e)[:500], seconds=round(time.time() - start, 2))
            raise
        self.update_stage(stage, status="done", ended=_now(), seconds=round(time.time() - start, 2),
                          metrics=metrics, error=None)


def run_path(root: str | Path, name: str) -> Path:
    """`root/name`, refusing names that leave `root` ('../x', absolute paths, a symlink out of it)."""
    root = Path(root).expanduser()
    parts = Path(str(name)).parts
    if not parts or Path(str(name)).is_absolute() or any(p in ("..", ".") for p in parts) or "\\" in str(name):
        raise ConfigError(f"run.name: {name!r} must be a relative name inside run.root ({root}); no '..', no absolute path")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"run.name: {root / name} resolves to {path.resolve()}, outside run.root {root.resolve()}")
    return path


def section_hash_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
