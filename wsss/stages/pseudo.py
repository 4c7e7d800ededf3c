"""Stage pseudo: pseudo masks from CAMs (`pseudo/<id>.png`, VOC palette, 255 = ignore).

The generator is `pseudo.method` (wsss/pseudo/__init__.py: threshold with optional confidence band,
CoV smoothing and dense CRF; PMM's PPMG; ...); it may ask for the image and the saliency map.
Where the split has ground truth, also measures seed quality (CAM mIoU over a background-threshold
sweep) and pseudo-mask mIoU; these are reported, never used to make the masks unless
pseudo.bg_threshold_auto is set (which looks at the GT, and says so).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from wsss.cam.store import read_cams
from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.errors import DataError
from wsss.io import atomic
from wsss.io.images import write_index_png
from wsss.config import options, plain
from wsss.pseudo import PseudoGenerator, build_generator
from wsss.pseudo.quality import best_threshold, cam_threshold_sweep, mask_quality, sweep_table
from wsss.stages.common import cam_split, split_dataset, stage_main, with_run_saliency

log = logging.getLogger("wsss")
STAGE = "pseudo"


class _PseudoJob(torch.utils.data.Dataset):
    """One image per item: read its CAMs (and image), make and write the mask. Runs in loader workers."""

    def __init__(self, ds, ids, cams_dir, out_dir, generator: PseudoGenerator):
        self.ds, self.ids, self.cams_dir, self.out_dir = ds, ids, cams_dir, out_dir
        self.generator = generator

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        sid = self.ids[i]
        classes, cams = read_cams(self.cams_dir / f"{sid}.npz")
        image = self.ds.load_image(sid) if "image" in self.generator.needs else None
        saliency = self.ds.load_saliency(sid, cams.shape[1:]) if "saliency" in self.generator.needs else None
        labels = self.generator(classes, cams, image, saliency)
        write_index_png(self.out_dir / f"{sid}.png", labels.astype(np.uint8))
        return 1


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out, cams_dir = rd.sub("pseudo"), rd.sub("cams")
    if rd.is_done(STAGE, [out]):
        log.info("pseudo: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    with rd.running(STAGE) as metrics:
        out.mkdir(parents=True, exist_ok=True)
        ds = with_run_saliency(rd, split_dataset(cfg, cam_split(cfg)))
        settings, opts = plain(cfg.pseudo), options(cfg, "pseudo", cfg.pseudo.method)
        generator = build_generator(cfg.pseudo.method, settings, opts)
        if "saliency" in generator.needs and not ds.has_saliency:  # fail before any work, with one line
            raise DataError(None, f"pseudo.method={cfg.pseudo.method} needs saliency maps and data set "
                                  f"{cfg.data.dataset} has none: add the saliency stage to run.stages or set data.saliency_dir")
        sweep = None
        quality_ids = ds.ids
        if cfg.pseudo.quality_split:
            keep = set(split_dataset(cfg, cfg.pseudo.quality_split).ids)
            quality_ids = [sid for sid in ds.ids if sid in keep]
        if ds.has_masks and dist.is_main() and quality_ids:
            sweep = cam_threshold_sweep(cams_dir, ds, quality_ids)
            t, m = best_threshold(sweep)
            metrics.update(cam_seed_miou=round(m.miou, 4), cam_seed_best_threshold=t,
                           cam_sweep={f"{tt:.2f}": round(mm.miou, 4) for tt, mm in sweep})
            log.info("pseudo: CAM seed mIoU %.2f at background threshold %.2f (best of the sweep)\n%s",
                     100 * m.miou, t, sweep_table(sweep))
        if cfg.pseudo.bg_threshold_auto:
            if sweep is None and dist.is_main():
                raise ValueError("pseudo.bg_threshold_auto needs ground-truth masks for the split")
            bg = best_threshold(sweep)[0] if dist.is_main() else None
            bg = _broadcast(bg)
            log.info("pseudo: bg_threshold_auto picked %.2f using ground truth", bg)
            generator = build_generator(cfg.pseudo.method, settings, opts, bg)
        todo = [sid for sid in dist.shard(ds.ids) if not (out / f"{sid}.png").exists()]
        workers = cfg.trainer.num_workers if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available() else 0
        loader = torch.utils.data.DataLoader(_PseudoJob(ds, todo, cams_dir, out, generator),
                                             batch_size=None, num_workers=workers)
        for _ in tqdm(loader, total=len(todo), desc="pseudo", disable=None if dist.is_main() else True, leave=False):
            pass
        dist.barrier()
        if dist.is_main():
            missing = [sid for sid in ds.ids if not (out / f"{sid}.png").exists()]
            if missing:
                raise RuntimeError(f"pseudo: {len(missing)} masks missing (e.g. {missing[0]})")
            metrics.update(images=len(ds), method=cfg.pseudo.method)
            if ds.has_masks and quality_ids:
                quality, labelled = mask_quality(out, ds, quality_ids)
                metrics.update(pseudo_miou=round(quality.miou, 4), labelled_fraction=round(labelled, 4),
                               pseudo_precision=round(quality.mean_precision, 4), pseudo_recall=round(quality.mean_recall, 4))
                rd.sub("metrics").mkdir(exist_ok=True)
                atomic.write_json(rd.sub("metrics", "pseudo.json"), {"pseudo": quality.to_dict(), "labelled_fraction": labelled,
                                  "cam_sweep": {f"{t:.2f}": m.to_dict() for t, m in sweep} if sweep else None})
                table = quality.table(f"pseudo masks ({cfg.pseudo.method}) vs ground truth, {len(quality_ids)} images of "
                                      f"split {cfg.pseudo.quality_split or cam_split(cfg)}")
                atomic.write_text(rd.sub("metrics", "pseudo.txt"), table + "\n")
                log.info("%s\npseudo: mIoU %.2f, %.1f%% of pixels labelled", table, 100 * quality.miou, 100 * labelled)
    return metrics


def _broadcast(value):
    if not dist.is_distributed():
        return value
    import torch.distributed as td

    obj = [value]
    td.broadcast_object_list(obj, src=0)
    return obj[0]


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
