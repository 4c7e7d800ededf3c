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
from wsss.data.transforms import Normalizer
from wsss.engine import dist
from wsss.engine.export import load_weights
from wsss.engine.modules import CAMModule
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import configure_threads
from wsss.models.backbones import normalization
from wsss.stages.common import (inference_device, iterate_groups, release_memory, size_groups, split_dataset,
                                stack_images, stage_main)

log = logging.getLogger("wsss")
STAGE = "cam"


def cam_split(cfg) -> str:
    return cfg.cam_infer.split or cfg.data.train_split


def load_cam_net(rd: RunDir, num_classes: int, class_names: list[str], device: torch.device) -> torch.nn.Module:
    net = CAMModule.build_net(rd.cfg, num_classes)
    load_weights(net, rd.sub("cam"), "cam", class_names)
    net = net.to(device).eval()
    if rd.cfg.cam.backbone.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


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
        net = load_cam_net(rd, ds.num_classes, ds.class_names, device)
        norm = Normalizer(*normalization(cfg.cam.backbone)).to(device)
        # Whole batches of equal-size images are sharded, and redone if any member is missing, so each
        # image is computed in the same batch at any process count and after a resume: identical bits.
        mine = dist.shard(size_groups(ds, ds.ids, 1 if cfg.cam_infer.mode == "multicrop" else cfg.cam_infer.batch_size))
        groups = [g for g in mine if not all((out / f"{sid}.npz").exists() for sid in g)]
        todo = [sid for g in groups for sid in g]
        if len(todo) < sum(map(len, mine)):
            log.info("cam: resuming, %d of %d images already done", sum(map(len, mine)) - len(todo), sum(map(len, mine)))
        cam_fn = cam_function(net, cfg, device)
        start = time.time()
        if cfg.cam_infer.mode == "multicrop":
            from wsss.cam.multicrop import run_multicrop

            run_multicrop(cam_fn, norm, ds, todo, out, cfg, device)
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


def cam_function(net: torch.nn.Module, cfg, device: torch.device = torch.device("cpu")) -> CamFn:
    """normalised images (N, 3, H, W) -> raw foreground CAMs (N, K, h, w): the configured output and engine."""
    if cfg.cam.objective == "seam":
        def cams(x: torch.Tensor) -> torch.Tensor:
            return net.infer_cams(x, cfg.cam_infer.output)
    else:
        def cams(x: torch.Tensor) -> torch.Tensor:
            return net(x)["cams"]
    if cfg.cam_infer.engine == "onnxruntime":
        if device.type == "cpu":
            from wsss.cam.onnx_engine import onnx_cam_fn

            return onnx_cam_fn(net, cams, torch.get_num_threads())
        log.warning("cam: cam_infer.engine=onnxruntime runs on CPU only; using torch on %s", device)
    if cfg.cam.backbone.channels_last:
        return lambda x: cams(x.contiguous(memory_format=torch.channels_last))
    return cams


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
