"""Dense-CRF refinement of a folder of CAMs into label maps (`wsss crf`), resumable and sharded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss.cam.store import read_cams
from wsss.crf import presets
from wsss.engine import dist
from wsss.errors import DataError
from wsss.io import atomic
from wsss.io.images import read_image, write_index_png
from wsss.io.paths import check_within
from wsss.pseudo.refine import crf_labels
from wsss.pseudo.threshold import cam_probabilities



def refine_folder(cams_dir: Path, images_dir: Path, out_dir: Path, preset: str, alpha: float, iterations: int = -1) -> int:
    """CRF-refine every `<id>.npz` in cams_dir with `<id>.jpg|png` from images_dir; return files written here."""
    if not cams_dir.is_dir():
        raise DataError(cams_dir, "CAM folder not found")
    params = presets.resolve(preset, iterations=iterations)
    ids = [p.stem for p in atomic.finished_files(cams_dir, "*.npz")]
    if not ids:
        raise DataError(cams_dir, "no .npz CAM files")
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():  # temporaries of a killed earlier attempt; before any process writes again
        atomic.clean_temporaries(out_dir)
    dist.barrier()
    todo = [sid for sid in dist.shard(ids) if not (out_dir / f"{sid}.png").exists()]
    for sid in tqdm(todo, desc="crf", disable=None if dist.is_main() else True, leave=False):
        image_path = next((images_dir / f"{sid}{ext}" for ext in (".jpg", ".png", ".jpeg") if (images_dir / f"{sid}{ext}").is_file()), None)
        if image_path is None:
            raise DataError(images_dir / f"{sid}.jpg", "image for this CAM file not found")
        # files symlinked out of the given folders are refused, like the data sets' list entries
        classes, cams = read_cams(check_within(cams_dir / f"{sid}.npz", cams_dir, "CAM file"))
        image = read_image(check_within(image_path, images_dir, "image"))
        if image.shape[:2] != cams.shape[1:]:
            raise DataError(image_path, f"image size {image.shape[:2]} differs from its CAMs {cams.shape[1:]}")
        keys = np.concatenate([[0], classes]).astype(np.uint8)
        write_index_png(out_dir / f"{sid}.png", keys[crf_labels(image, cam_probabilities(classes, cams, alpha), params)])
    dist.barrier()
    return len(todo)
