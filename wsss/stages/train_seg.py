"""Stage train_seg: train the segmentation method (`seg.method`) on pseudo masks, ground-truth masks or scribbles.

`seg.labels` picks the target (pseudo | gt | scribble), `seg.loss.name` the pixel loss (ce, puf, pce)
and `seg.loss.regularizer` an optional regulariser (densecrf, dfr, ...). Writes `seg/model.safetensors` (+ model.json), checkpoints and logs.
Validation mIoU (seg.val_every > 0) is logged for monitoring only; the exported model is the last one.
`seg.init` starts the network from a trained segmenter (rloss's two phases: pCE first, then fine-tuning
with the regulariser); a resumed checkpoint wins over it.
Under the convergence protocol (seg.convergence.holdout > 0, docs/protocol.md) a fixed part of the
train split is held out of training instead: training stops when its mIoU stops improving and the
weights with its best mIoU are exported.

`train_segmenter` is also what each PMM cyclic round runs (stage cyclic, through stages/common.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsss.engine.rundir import RunDir
from wsss.stages.common import stage_main, train_segmenter

log = logging.getLogger("wsss")
STAGE = "train_seg"


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out = rd.sub("seg")
    if rd.is_done(STAGE, [out / "model.safetensors"]):
        log.info("train_seg: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    with rd.running(STAGE) as metrics:
        pseudo_dir = rd.sub("pseudo") if cfg.seg.labels == "pseudo" else None
        init = Path(cfg.seg.init).expanduser() if cfg.seg.init else None
        metrics.update(train_segmenter(rd, out, cfg.seg.labels, pseudo_dir, init=init))
    return metrics


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
