"""Stage train_seg: train the segmenter on pseudo masks, ground-truth masks or scribbles.

`seg.labels` picks the target (pseudo | gt | scribble) and `seg.loss.name` the loss (ce, puf, pce,
pce_densecrf, dfr). Writes `seg/model.safetensors` (+ model.json), checkpoints and logs.
Validation mIoU (seg.val_every > 0) is logged for monitoring only; the exported model is the last one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
from torch.utils.data import DataLoader

from wsss.data.transforms import InferenceSet, SegmentationSet, collate_list, train_augment
from wsss.engine import dist
from wsss.engine.export import export_net
from wsss.engine.modules import SegModule
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import build_trainer, configure_threads, fit, train_loader
from wsss.stages.common import split_dataset, stage_main

log = logging.getLogger("wsss")
STAGE = "train_seg"


def train_segmenter(rd: RunDir, out: Path, source: str, pseudo_dir: Optional[Path], loss_name: Optional[str] = None) -> dict:
    """Train one segmenter into `out`; returns its metrics."""
    cfg = rd.cfg
    configure_threads(cfg)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    ds = split_dataset(cfg, cfg.data.train_split)
    train_set = SegmentationSet(ds, source, train_augment(cfg.seg, with_masks=True), pseudo_dir)
    loader = train_loader(train_set, cfg.seg.batch_size, cfg.trainer.num_workers, cfg.trainer.seed)
    val_loader = None
    if cfg.seg.val_every > 0:
        val = split_dataset(cfg, cfg.eval.split or cfg.data.val_split)
        if val.has_masks:
            val_loader = DataLoader(InferenceSet(val, val.ids, ("image", "mask")), batch_size=1, collate_fn=collate_list,
                                    num_workers=cfg.trainer.num_workers)
    module = SegModule(cfg, ds.num_classes, ds.class_names, loss_name)
    trainer = build_trainer(cfg, out, cfg.seg.epochs, cfg.seg.max_steps, val_every=cfg.seg.val_every if val_loader else 0,
                            steps_per_epoch=len(loader))
    log.info("%s: %s/%s on %d images, labels=%s, loss=%s, %s", out.name, cfg.seg.arch, cfg.seg.encoder.name, len(ds), source,
             module.loss_name, f"{cfg.seg.max_steps} steps" if cfg.seg.max_steps > 0 else f"{cfg.seg.epochs} epochs")
    start = fit(trainer, module, out, loader, val_loader)
    if dist.is_main():
        export_net(module.net, out, "seg", cfg.seg, ds.class_names)
    dist.barrier()
    metrics = {"steps": int(trainer.global_step), "resumed_from_step": start, "images": len(ds), "labels": source,
               "loss": module.loss_name,
               "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}
    if "val/miou" in trainer.callback_metrics:
        metrics["last_val_miou_monitor"] = float(trainer.callback_metrics["val/miou"])
    return metrics


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out = rd.sub("seg")
    if rd.is_done(STAGE, [out / "model.safetensors"]):
        log.info("train_seg: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    with rd.running(STAGE) as metrics:
        pseudo_dir = rd.sub("pseudo") if cfg.seg.labels == "pseudo" else None
        metrics.update(train_segmenter(rd, out, cfg.seg.labels, pseudo_dir))
    return metrics


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
