"""Draw a grid of the synthetic `shapes` set: image | ground truth | saliency | scribbles.

    python examples/show_shapes.py docs/images/shapes.jpg
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from wsss.data.scribble_sim import scribble_seed, simulate_scribbles
from wsss.data.shapes import generate_sample
from wsss.io.images import colorize
from wsss.viz.overlays import mask_overlay


def main(out: str, rows: int = 4, cols: int = 3, size: int = 96, zoom: int = 2) -> None:
    gap = np.full((size, 3, 3), 255, np.uint8)
    lines = []
    for r in range(rows):
        tiles = []
        for c in range(cols):
            s = generate_sample(1000 + r * cols + c, size)
            sal = (np.repeat(s["saliency"][..., None], 3, 2) * 255).astype(np.uint8)
            scrib = simulate_scribbles(s["mask"], seed=scribble_seed(0, f"{r}-{c}"))
            tiles += [s["image"], colorize(s["mask"]), sal, mask_overlay(s["image"], scrib, alpha=1.0), gap, gap]
        lines.append(np.concatenate(tiles[:-2], 1))
        lines.append(np.full((3, lines[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(lines[:-1], 0)
    grid = cv2.resize(grid, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(out, grid[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 88])  # ignored for PNG
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "shapes.png")
