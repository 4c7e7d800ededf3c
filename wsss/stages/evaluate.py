"""Stage evaluate: predict a split with the trained segmenter and score it against ground truth.

Single-scale by default; `eval.scales`, `eval.flip` and `eval.crf` turn on multi-scale, flip and
dense-CRF inference (report which in any number you quote). Writes `pred/<id>.png`,
`metrics/evaluate.json` and the per-class table `metrics/evaluate.txt`.

Scoring any two folders of index PNGs (`wsss evaluate --pred DIR --gt DIR`) lives in
wsss/evaluation.py, which has no deep-learning imports.
"""

from __future__ import annotations

import logging
from tqdm import tqdm

from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import configure_threads
from wsss.errors import DataError
from wsss.evaluation import save_metrics
from wsss.io.images import read_index_png, write_index_png
from wsss.metrics import ConfusionMatrix
from wsss.pipeline import final_model_dir
from wsss.stages.common import crf_params, inference_device, load_predictor, release_memory, split_dataset, stage_main

log = logging.getLogger("wsss")
STAGE = "evaluate"


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out = rd.sub("pred")
    if rd.is_done(STAGE, [out, rd.sub("metrics", "evaluate.json")]):
        log.info("evaluate: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    with rd.running(STAGE) as metrics:
        configure_threads(cfg)
        split = cfg.eval.split or cfg.data.val_split
        ds = split_dataset(cfg, split)
        if not ds.has_masks:
            raise DataError(None, f"evaluate: split {split!r} has no ground-truth masks; use `wsss predict` for unlabelled images")
        predictor = load_predictor(cfg, final_model_dir(rd), ds.class_names, inference_device(cfg))
        crf = crf_params(cfg.eval.crf_params) if cfg.eval.crf else None
        out.mkdir(parents=True, exist_ok=True)
        todo = [sid for sid in dist.shard(ds.ids) if not (out / f"{sid}.png").exists()]
        for sid in tqdm(todo, desc="evaluate", disable=None if dist.is_main() else True, leave=False):
            write_index_png(out / f"{sid}.png", predictor.labels(ds.load_image(sid), cfg.eval.scales, cfg.eval.flip, crf))
            release_memory()  # images of many sizes: keep memory flat
        dist.barrier()
        if dist.is_main():
            cm = ConfusionMatrix(ds.num_classes)
            for sid in ds.ids:
                gt = ds.load_mask(sid)
                cm.update(read_index_png(out / f"{sid}.png", ds.num_classes, gt.shape, "prediction",
                                        against="its ground-truth mask"), gt)
            result = cm.compute(ds.class_names, cfg.eval.absent)
            protocol = f"scales {list(cfg.eval.scales)}, flip {cfg.eval.flip}, crf {cfg.eval.crf}"
            save_metrics(rd.sub("metrics"), "evaluate", result, f"segmenter on {split} ({len(ds)} images; {protocol})")
            metrics.update(miou=round(result.miou, 4), pixel_accuracy=round(result.pixel_accuracy, 4), split=split,
                           images=len(ds), protocol=protocol)
    return metrics


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
