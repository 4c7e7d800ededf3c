"""Stage cam: multi-scale + flip CAMs for every image of a split, one `cams/<id>.npz` each.

Only the classes in an image's labels are computed; maps are normalised per class to [0, 1] and
stored as float16. Images of equal size share forward passes. The stage streams (memory does not
grow with the number of images), shards the ids across torchrun processes, and resumes from the
first missing file after an interruption.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from wsss.cam.infer import CamFn, multiscale_cams
from wsss.cam.store import write_cams
from wsss.engine import dist
from wsss.engine.export import load_weights
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import configure_threads
from wsss.stages.common import (cam_method, cam_split, inference_device, iterate_groups, release_memory, size_groups,
                                split_dataset, stack_images, stage_main)

log = logging.getLogger("wsss")
STAGE = "cam"


def load_cam_method(rd: RunDir, num_classes: int, class_names: list[str], device: torch.device) -> torch.nn.Module:
    """The recipe's CAM method with the weights trained into cam/, in eval mode on `device`."""
    method = cam_method(rd.cfg, num_classes)
    load_weights(method.net, rd.sub("cam"), "cam", class_names)
    return method.to(device).eval()


def run(rd: RunDir) -> dict:
    cfg = rd.cfg
    out = rd.sub("cams")
    if rd.is_done(STAGE, [out]):
        log.info("cam: done for this config, skipping (--force to rerun)")
        return rd.metrics(STAGE)
    rd.reset_outputs_if_stale(STAGE, [out])
    with rd.running(STAGE) as metrics:
        configure_threads(cfg)
        out.mkdir(parents=True, exist_ok=True)
        ds = split_dataset(cfg, cam_split(cfg))
        device = inference_device(cfg)
        method = load_cam_method(rd, ds.num_classes, ds.class_names, device)
        norm = method.norm
        # Whole batches of equal-size images are sharded, and redone if any member is missing, so each
        # image is computed in the same batch at any process count and after a resume: identical bits.
        mine = dist.shard(size_groups(ds, ds.ids, 1 if cfg.cam_infer.mode == "multicrop" else cfg.cam_infer.batch_size))
        groups = [g for g in mine if not all((out / f"{sid}.npz").exists() for sid in g)]
        todo = [sid for g in groups for sid in g]
        if len(todo) < sum(map(len, mine)):
            log.info("cam: resuming, %d of %d images already done", sum(map(len, mine)) - len(todo), sum(map(len, mine)))
        cam_fn = cam_function(method, cfg.cam_infer.output, cfg.cam_infer.engine, device)
        start = time.time()
        if cfg.cam_infer.mode == "multicrop":
            from wsss.cam.multicrop import run_multicrop

            mc = cfg.cam_infer.multicrop
            run_multicrop(cam_fn, norm, ds, todo, out, device, list(mc.scales), mc.crop_size, mc.stride,
                          cfg.cam_infer.flip, cfg.cam_infer.batch_size)
        else:
            bar = tqdm(total=len(todo), desc="cam", disable=None if dist.is_main() else True, leave=False)
            for samples in iterate_groups(ds, groups, cfg.trainer.num_workers):
                x = norm(stack_images(samples, device))
                labels = torch.from_numpy(np.stack([s["labels"] for s in samples])).to(device)
                for s, (classes, maps) in zip(samples, multiscale_cams(cam_fn, x, labels, cfg.cam_infer.scales, cfg.cam_infer.flip)):
                    write_cams(out / f"{s['id']}.npz", classes, maps.cpu().numpy())
                release_memory()
                bar.update(len(samples))
            bar.close()
        seconds = dist.all_max(time.time() - start)  # the slowest process
        computed = int(dist.all_sum(len(todo)))
        dist.barrier()
        missing = [sid for sid in ds.ids if not (out / f"{sid}.npz").exists()]
        if missing:
            raise RuntimeError(f"cam: {len(missing)} CAM files missing after inference (e.g. {missing[0]})")
        metrics.update(images=len(ds), computed=computed, processes=dist.world_size(),
                       images_per_second=round(computed / max(seconds, 1e-9), 3))
        log.info("cam: %d images (%d computed, %.2f img/s over %d process(es))", len(ds), computed,
                 metrics["images_per_second"], dist.world_size())
    return metrics


def cam_function(method: torch.nn.Module, output: str = "cam", engine: str = "torch",
                 device: torch.device = torch.device("cpu")) -> CamFn:
    """normalised images (N, 3, H, W) -> raw foreground CAMs (N, K, h, w): the method's `output`, run by `engine`."""
    def cams(x: torch.Tensor) -> torch.Tensor:
        return method.cams(x, output)

    if engine == "onnxruntime":
        if device.type == "cpu":
            from wsss.cam.onnx_engine import onnx_cam_fn

            return onnx_cam_fn(method.net, cams, torch.get_num_threads())
        log.warning("cam: cam_infer.engine=onnxruntime runs on CPU only; using torch on %s", device)
    if method.channels_last:
        return lambda x: cams(x.contiguous(memory_format=torch.channels_last))
    return cams


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
