"""Stage cyclic: PMM's Cyclic Pseudo-mask rounds (WSSS_MMSeg `tools/run_wsss.sh`).

Round k (k = 1..cyclic.rounds): the previous segmenter (`seg/` for k = 1, else `seg_r<k-1>/`)
predicts every training image with multi-scale + flip (+ dense CRF, preset `pmm_cyclic`) into
`pseudo_r<k>/`, and a *fresh* segmenter is trained on those masks into `seg_r<k>/` with
`cyclic.loss` (plain CE in the official configs). Evaluation then uses the last round's model.

Model selection: `cyclic.selection: last` (default) keeps each round's final weights and never
looks at validation ground truth. `best_val_uses_gt` is what the official script does
(`tools/pick_best_pth.py` keeps the checkpoint with the best *val* mIoU): each round's segmenter is
validated every `seg.val_every` epochs (1 if unset) and its best-val weights are kept. Numbers
obtained that way are selected on the evaluation split; say so when quoting them. The first
segmenter (`seg/`, stage train_seg) always keeps its last weights here. Under the convergence
protocol (seg.convergence.holdout > 0) every segmenter, `seg/` included, keeps its best weights on
the held-out part of the train split instead; best_val_uses_gt is then refused.

Per-image work is sharded across torchrun processes and resumes from the first missing mask; a
round whose model exists is not retrained.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import configure_threads
from wsss.io.images import write_index_png
from wsss.pseudo.quality import mask_quality
from wsss.stages.common import (crf_params, inference_device, kept_round_metrics, load_predictor, round_outputs,
                                 split_dataset, stage_main, train_segmenter)

log = logging.getLogger("wsss")
STAGE = "cyclic"


def round_dirs(rd: RunDir, k: int) -> tuple[Path, Path]:
    """(pseudo_r<k>/, seg_r<k>/) of round k."""
    return rd.sub(f"pseudo_r{k}"), rd.sub(f"seg_r{k}")


def predict_masks(rd: RunDir, model_dir: Path, out: Path) -> int:
    """Write `out/<id>.png` for this rank's share of the training images; returns how many were computed."""
    cfg = rd.cfg
    ds = split_dataset(cfg, cfg.data.train_split)
    predictor = load_predictor(cfg, model_dir, ds.class_names, inference_device(cfg))
    crf = crf_params(cfg.cyclic.crf_params) if cfg.cyclic.crf else None
    out.mkdir(parents=True, exist_ok=True)
    todo = [sid for sid in dist.shard(ds.ids) if not (out / f"{sid}.png").exists()]
    for sid in tqdm(todo, desc=out.name, disable=None if dist.is_main() else True, leave=False):
        write_index_png(out / f"{sid}.png", predictor.labels(ds.load_image(sid), cfg.cyclic.scales, cfg.cyclic.flip, crf))
    dist.barrier()
    missing = [sid for sid in ds.ids if not (out / f"{sid}.png").exists()]
    if missing:
        raise RuntimeError(f"cyclic: {len(missing)} masks missing in {out} (e.g. {missing[0]})")
    return len(todo)


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    rounds = cfg.cyclic.rounds
    if rounds < 1:
        log.info("cyclic: cyclic.rounds is 0, nothing to do")
        return {}
    last_model = round_dirs(rd, rounds)[1] / "model.safetensors"
    if rd.is_done(STAGE, [last_model]):
        log.info("cyclic: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, round_outputs(rd, STAGE))
    with rd.running(STAGE) as metrics:
        configure_threads(cfg)
        source = rd.sub("seg")
        for k in range(1, rounds + 1):
            masks, model = round_dirs(rd, k)
            trained = (model / "model.safetensors").is_file()
            if not trained:
                computed = predict_masks(rd, source, masks)
                log.info("cyclic round %d: %d masks predicted by %s (scales %s, flip %s, crf %s)", k, computed,
                         source.name, list(cfg.cyclic.scales), cfg.cyclic.flip, cfg.cyclic.crf)
            if masks.is_dir():
                metrics.update(_mask_metrics(rd, masks, k))
            if not trained:
                metrics[f"r{k}_train"] = train_segmenter(rd, model, "pseudo", masks, cfg.cyclic.loss,
                                                         keep_best_val=cfg.cyclic.selection == "best_val_uses_gt")
            else:  # made by an earlier run of this config (fewer rounds, or killed)
                metrics.update(kept_round_metrics(rd, STAGE, k))
            source = model
        metrics.update(rounds=rounds, selection=cfg.cyclic.selection, final_model=source.name)
    return metrics


def _mask_metrics(rd: RunDir, masks: Path, k: int) -> dict:
    """Quality of round k's masks against the training split's GT, when it has any (reported only)."""
    ds = split_dataset(rd.cfg, rd.cfg.data.train_split)
    if not (ds.has_masks and dist.is_main()):
        return {}
    ids = ds.ids
    if rd.cfg.pseudo.quality_split:
        keep = set(split_dataset(rd.cfg, rd.cfg.pseudo.quality_split).ids)
        ids = [sid for sid in ids if sid in keep]
    if not ids:
        return {}
    quality, _ = mask_quality(masks, ds, ids)
    log.info("cyclic round %d: mask mIoU %.2f on %d training images", k, 100 * quality.miou, len(ids))
    return {f"r{k}_pseudo_miou": round(quality.miou, 4)}


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
