"""Predict new images with a trained run: index PNGs (VOC palette) plus overlays.

`wsss predict RECIPE --input DIR --output DIR [--scales 1.0,0.75,1.25] [--flip] [--crf]`
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.engine.trainer import configure_threads
from wsss.errors import DataError
from wsss.io import atomic
from wsss.io.images import read_image, write_index_png, write_rgb_png
from wsss.io.paths import check_within
from wsss.pipeline import final_model_dir
from wsss.stages.common import crf_params, inference_device, load_predictor, release_memory, split_dataset
from wsss.viz.overlays import mask_overlay

log = logging.getLogger("wsss")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def predict_folder(rd: RunDir, input_dir: Path, output_dir: Path, scales: Sequence[float], flip: bool, crf: bool) -> int:
    """Segment every image in `input_dir` (sharded across processes); return how many this process wrote."""
    cfg = rd.cfg
    if not input_dir.is_dir():
        raise DataError(input_dir, "input folder not found")
    files = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(input_dir, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    for p in files:  # symlinks pointing out of the input folder are not followed
        check_within(p, input_dir, "input image")
    stems = [p.stem for p in files]
    if len(set(stems)) < len(stems):  # a.jpg and a.png would both write a.png (and race across processes)
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(input_dir, f"two images named {dup!r} (different extensions); outputs are <name>.png")
    configure_threads(cfg)
    class_names = split_dataset(cfg, cfg.data.train_split).class_names
    predictor = load_predictor(cfg, final_model_dir(rd), class_names, inference_device(cfg))
    params = crf_params(cfg.eval.crf_params) if crf else None
    output_dir.mkdir(parents=True, exist_ok=True)
    check_within(output_dir / "overlay", output_dir, "overlay folder")
    if dist.is_main():  # temporaries of a killed earlier attempt; before any process writes again
        atomic.clean_temporaries(output_dir)
    dist.barrier()
    todo = [p for p in dist.shard(files) if not (output_dir / f"{p.stem}.png").exists()]
    for path in tqdm(todo, desc="predict", disable=None if dist.is_main() else True, leave=False):
        image = read_image(path, cfg.data.image_mode, cfg.data.max_pixels)
        labels = predictor.labels(image, scales, flip, params)
        write_rgb_png(output_dir / "overlay" / f"{path.stem}.png", mask_overlay(image, labels))
        write_index_png(output_dir / f"{path.stem}.png", labels)  # last: its presence marks the image done
        release_memory()  # images of many sizes: keep memory flat
    dist.barrier()
    return len(todo)
