"""Stage accumulated_cams: the localization maps accumulated during CAM training, as `cams/<id>.npz`.

Some CAM methods (Group-WSSS, `cam.method: group`) keep per image the running pixel-wise maximum of
their maps over the training epochs in `cam/accumulated/<id>.npz` (wsss/cam/accumulate.py). This
stage resizes them to the image size (bilinear, like the official `vis.py`) and writes the ordinary
CAM files the later stages read, so it replaces the stage `cam` in `run.stages`. A labelled class with
no accumulated map gets an all-zero map (counted in the metrics as `missing_maps`). Resumes from the
first missing file of its own interrupted run (a `cams/` written by the stage `cam` is moved to
`cams.old` first) and shards the ids under torchrun.
"""

from __future__ import annotations

import logging
import os
import shutil

import cv2
import numpy as np

from wsss.cam.accumulate import AccumulatedMaps
from wsss.cam.store import write_cams
from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.errors import ConfigError
from wsss.io.images import image_size
from wsss.stages.common import cam_split, split_dataset, stage_main

log = logging.getLogger("wsss")
STAGE = "accumulated_cams"


def image_cams(store: AccumulatedMaps, sample_id: str, labels: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(classes (K,), maps (K, H, W) in [0, 1], number of labelled classes without a map) for one image."""
    stored = store.read(sample_id)
    classes = np.flatnonzero(labels > 0.5) + 1
    maps, missing = [], 0
    for c in classes:
        m = stored.get(int(c))
        if m is None:
            missing += 1
            maps.append(np.zeros(hw, np.float32))
            continue
        maps.append(np.clip(cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0))
    return classes, np.stack(maps) if maps else np.zeros((0, *hw), np.float32), missing


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out, store = rd.sub("cams"), AccumulatedMaps(rd.sub("cam", "accumulated"))
    if rd.is_done(STAGE, [out]):
        log.info("accumulated_cams: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    _set_aside_other_writers(rd, out)
    with rd.running(STAGE) as metrics:
        if cam_split(cfg) != cfg.data.train_split:
            raise ConfigError(f"cam_infer.split={cam_split(cfg)}: maps are accumulated on the training split "
                              f"({cfg.data.train_split}) only; use the stage cam for other splits")
        if not store.dir.is_dir():
            raise ConfigError(f"{store.dir}: no accumulated maps; the stage accumulated_cams needs a CAM method that "
                              f"accumulates them (e.g. cam.method=group with cam.group.accumulate=true)")
        out.mkdir(parents=True, exist_ok=True)
        ds = split_dataset(cfg, cam_split(cfg))
        todo = [sid for sid in dist.shard(ds.ids) if not (out / f"{sid}.npz").exists()]
        missing = 0
        for sid in todo:
            hw = image_size(ds.image_path(sid), ds.max_pixels)
            classes, maps, m = image_cams(store, sid, ds.load_labels(sid), hw)
            missing += m
            write_cams(out / f"{sid}.npz", classes, maps)
        missing = int(dist.all_sum(missing))
        dist.barrier()
        if missing:
            log.warning("accumulated_cams: %d labelled classes had no accumulated map (all-zero maps written); "
                        "training was probably cut short (cam.max_steps) before every image was an anchor", missing)
        metrics.update(images=len(ds), computed=int(dist.all_sum(len(todo))), missing_maps=missing)
    return metrics


def _set_aside_other_writers(rd: RunDir, out) -> None:
    """cams/ left by another stage (cam) is not ours to resume from: move it to cams.old (one generation kept)."""
    info = rd.stage_info(STAGE)
    resuming = info.get("config_hash") == rd.stage_hash(STAGE) and info.get("status") in ("running", "interrupted", "failed")
    if dist.is_main() and out.exists() and not resuming:
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        log.info("accumulated_cams: %s was written by another stage, moved to %s", out, old)
    dist.barrier()


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
