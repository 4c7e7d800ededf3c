"""Stage train_cam: train the CAM network of `cam.method` on image-level labels.

Reads the train split's images and labels; the method (wsss/cam/methods.py) says what one training
step does and how batches are drawn. Writes `cam/model.safetensors` (+ model.json),
resumable checkpoints in `cam/checkpoints/` and logs in `cam/logs/`.
"""

from __future__ import annotations

import logging

import lightning as L

from wsss.data.transforms import ClassificationSet, train_augment
from wsss.engine import dist
from wsss.engine.export import export_net
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import build_trainer, configure_threads, fit
from wsss.stages.common import cam_method, split_dataset, stage_main

log = logging.getLogger("wsss")
STAGE = "train_cam"


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out = rd.sub("cam")
    if rd.is_done(STAGE, [out / "model.safetensors"]):
        log.info("train_cam: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    with rd.running(STAGE) as metrics:
        configure_threads(cfg)
        L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        ds = split_dataset(cfg, cfg.data.train_split).check(("labels",))
        train_set = ClassificationSet(ds, train_augment(cfg.cam, with_masks=False, seed=cfg.trainer.seed))
        module = cam_method(cfg, ds.num_classes)
        loader = module.train_loader(train_set, cfg.cam.batch_size, cfg.trainer.num_workers, cfg.trainer.seed, module.options)
        trainer = build_trainer(cfg, out, cfg.cam.epochs, cfg.cam.max_steps, steps_per_epoch=len(loader),
                                callbacks=module.callbacks(out))
        log.info("train_cam: %s (%s) on %d images, %s", cfg.cam.method, cfg.cam.backbone.name, len(ds),
                 f"{cfg.cam.max_steps} steps" if cfg.cam.max_steps > 0 else f"{cfg.cam.epochs} epochs")
        start = fit(trainer, module, out, loader, name=STAGE)
        if dist.is_main():
            export_net(module.net, out, "cam", cfg.cam, ds.class_names)
        metrics.update(steps=int(trainer.global_step), images=len(ds), resumed_from_step=start,
                       final_loss=float(trainer.callback_metrics.get("train/loss", float("nan"))))
        dist.barrier()
    return metrics


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
