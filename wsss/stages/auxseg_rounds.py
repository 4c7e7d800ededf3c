"""Stage auxseg_rounds: AuxSegNet's iterative training and pseudo-label updates (official main.py loop).

Round k = 1..seg.auxsegnet.rounds (official 4):
  1. train AuxSegNet (seg.method=auxsegnet) into `seg_r<k>/` on the labels of round k-1: `pseudo/`
     (the pseudo stage, pseudo.method=auxsegnet: CAMs + the data set's saliency) and the data set's
     saliency maps for k = 1, else `pseudo_r<k-1>/` with its `saliency/` maps. Round 1 starts from
     the CAM network (init_from_cam), round k from round k-1's network (warm_start).
  2. update the labels with `seg_r<k>` into `pseudo_r<k>/` (official step/gen_pgt.py), per image,
     single scale, whole image:
       CAMs: ReLU, max-normalised, propagated by the cross-task affinity, upsampled;
       saliency: (sigmoid(refined saliency) + initial saliency) / 2, refined by the two-label dense CRF
       (preset auxsegnet_sal, crf_for_sal's unaries) -> `pseudo_r<k>/saliency/<id>.png`;
       labels: the fusion rule of pseudo.auxsegnet (wsss/pseudo/auxsegnet.py) -> `pseudo_r<k>/<id>.png`.
Each round's label mIoU (train GT, reported only) goes to the manifest as r<k>_pseudo_miou.
With update_labels=false (a control) every round trains on `pseudo/` and step 2 is skipped.

Resumable by round: a round whose model exists is not retrained, a killed training resumes from its
checkpoint, label updates resume from the first missing image; per-image work is sharded under torchrun.
More rounds extend a finished run (seg.auxsegnet.rounds is the stage table's `grows` key).
Evaluation and prediction use the last round's model (`seg_r<rounds>/`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from wsss.config import options
from wsss.crf import presets
from wsss.engine import dist
from wsss.engine.auxsegnet import SALIENCY_SUBDIR, AuxSegNetOptions
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import configure_threads
from wsss.errors import ConfigError
from wsss.io import atomic
from wsss.io.images import write_index_png
from wsss.pseudo.auxsegnet import AuxFusionOptions, fuse_cam_saliency, saliency_crf
from wsss.pseudo.quality import mask_quality
from wsss.stages.common import (inference_device, kept_round_metrics, load_predictor, round_outputs, split_dataset,
                                stage_main, train_segmenter, with_run_saliency)

log = logging.getLogger("wsss")
STAGE = "auxseg_rounds"


def labels_dir(rd: RunDir, k: int) -> Path:
    """The labels round k+1 trains on: `pseudo/` (k = 0) or `pseudo_r<k>/`."""
    return rd.sub("pseudo") if k == 0 else rd.sub(f"pseudo_r{k}")


def model_dir(rd: RunDir, k: int) -> Path:
    return rd.sub(f"seg_r{k}")


def _init_dir(rd: RunDir, k: int, o: AuxSegNetOptions) -> Optional[Path]:
    """The weights round k starts from (None: the backbone's own initialisation)."""
    if k > 1:
        return model_dir(rd, k - 1) if o.warm_start else None
    if not o.init_from_cam:
        return None
    cam, seg = rd.cfg.cam.backbone.name, rd.cfg.seg.encoder.name
    if cam != seg:
        raise ConfigError(f"seg.auxsegnet.init_from_cam: the CAM network ({cam}) and AuxSegNet ({seg}) need the same "
                          "backbone; set seg.encoder.name to cam.backbone.name or init_from_cam=false")
    if not (rd.sub("cam") / "model.safetensors").is_file():
        raise ConfigError(f"seg.auxsegnet.init_from_cam: {rd.sub('cam', 'model.safetensors')} not found; run train_cam "
                          "first or set init_from_cam=false")
    return rd.sub("cam")


def update_labels(rd: RunDir, k: int, o: AuxSegNetOptions, fusion: AuxFusionOptions) -> int:
    """Write `pseudo_r<k>/<id>.png` and `pseudo_r<k>/saliency/<id>.png` with round k's network for this
    rank's share of the training images (missing ones only); returns how many were computed."""
    cfg = rd.cfg
    ds = with_run_saliency(rd, split_dataset(cfg, cfg.data.train_split))
    out = labels_dir(rd, k)
    sal_out = out / SALIENCY_SUBDIR
    sal_out.mkdir(parents=True, exist_ok=True)
    prev_sal = labels_dir(rd, k - 1) / SALIENCY_SUBDIR if o.saliency_from == "previous" and k > 1 else None
    crf = presets.resolve(**{f: getattr(o.sal_crf, f) for f in ("preset", *presets.FIELDS)})
    device = inference_device(cfg)
    predictor = load_predictor(cfg, model_dir(rd, k), ds.class_names, device)
    todo = [sid for sid in dist.shard(ds.ids) if not (out / f"{sid}.png").exists()]
    for sid in tqdm(todo, desc=out.name, disable=None if dist.is_main() else True, leave=False):
        image = ds.load_image(sid)
        hw = image.shape[:2]
        x = predictor.norm(torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float())
        maps = predictor.method.update_maps(x)
        initial = _read_previous(prev_sal, sid, hw, ds.max_pixels) if prev_sal is not None else ds.load_saliency(sid, hw)
        if initial is None:
            raise ConfigError("auxseg_rounds: the data set has no saliency maps; set data.saliency_dir")
        if maps["saliency"] is not None:  # official: (network + off-the-shelf) / 2, then crf_for_sal
            fused = (maps["saliency"].cpu().numpy() + initial) / 2
            sal = saliency_crf(image, fused, crf, o.sal_crf_tau)
        else:  # no saliency task: the initial maps stay
            sal = initial
        atomic.write_with(sal_out / f"{sid}.png", lambda f, s=sal: _save_gray(f, s))
        labels = ds.load_labels(sid)
        classes = np.flatnonzero(labels) + 1
        cams = maps["cams"].cpu().numpy()[classes - 1]
        write_index_png(out / f"{sid}.png", fuse_cam_saliency(classes, cams, sal, fusion.cam_threshold,
                                                              fusion.sal_threshold))
    dist.barrier()
    missing = [sid for sid in ds.ids if not (out / f"{sid}.png").exists()]
    if missing:
        raise RuntimeError(f"auxseg_rounds: {len(missing)} labels missing in {out} (e.g. {missing[0]})")
    return len(todo)


def _read_previous(directory: Path, sid: str, hw: tuple[int, int], max_pixels: int) -> np.ndarray:
    from wsss.io.images import read_saliency

    return read_saliency(directory / f"{sid}.png", hw, max_pixels)


def _save_gray(f: Any, sal: np.ndarray) -> None:
    """Saliency in [0, 1] as an 8-bit grayscale PNG (x 255, truncated as the official save_as_png)."""
    from PIL import Image

    Image.fromarray((np.clip(sal, 0, 1) * 255).astype(np.uint8), mode="L").save(f, format="PNG")


def _quality(rd: RunDir, k: int) -> dict:
    """Round k's label mIoU against the training split's GT, when it has any (reported only)."""
    cfg = rd.cfg
    ds = with_run_saliency(rd, split_dataset(cfg, cfg.data.train_split))
    if not (ds.has_masks and dist.is_main()):
        return {}
    ids = ds.ids
    if cfg.pseudo.quality_split:
        keep = set(split_dataset(cfg, cfg.pseudo.quality_split).ids)
        ids = [sid for sid in ids if sid in keep]
    if not ids:
        return {}
    quality, labelled = mask_quality(labels_dir(rd, k), ds, ids)
    log.info("auxseg round %d: label mIoU %.2f (%.1f%% of pixels labelled) on %d training images", k,
             100 * quality.miou, 100 * labelled, len(ids))
    return {f"r{k}_pseudo_miou": round(quality.miou, 4), f"r{k}_labelled_fraction": round(labelled, 4)}


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    if cfg.seg.method != "auxsegnet":
        raise ConfigError(f"run.stages: auxseg_rounds trains AuxSegNet; set seg.method=auxsegnet (is {cfg.seg.method})")
    o: AuxSegNetOptions = options(cfg, "seg", "auxsegnet")
    fusion: AuxFusionOptions = options(cfg, "pseudo", "auxsegnet")
    rounds = o.rounds
    updates = o.update_labels
    last = [model_dir(rd, rounds) / "model.safetensors"] + ([labels_dir(rd, rounds)] if updates and o.update_after_last else [])
    if rd.is_done(STAGE, last):
        log.info("auxseg_rounds: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, round_outputs(rd, STAGE))
    with rd.running(STAGE) as metrics:
        configure_threads(cfg)
        for k in range(1, rounds + 1):
            model = model_dir(rd, k)
            if not (model / "model.safetensors").is_file():
                labels = labels_dir(rd, k - 1 if updates else 0)
                metrics[f"r{k}_train"] = train_segmenter(rd, model, "pseudo", labels, init=_init_dir(rd, k, o))
            else:  # made by an earlier run of this config (fewer rounds, or killed)
                metrics.update(kept_round_metrics(rd, STAGE, k))
            if updates and (k < rounds or o.update_after_last):
                computed = update_labels(rd, k, o, fusion)
                log.info("auxseg round %d: %d labels updated by %s", k, computed, model.name)
                metrics.update(_quality(rd, k))
        metrics.update(rounds=rounds, final_model=model_dir(rd, rounds).name)
    return metrics


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
