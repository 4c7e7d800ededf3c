"""Pictures for reports and predictions: palette overlays, CAM heatmaps, resizing, inline data URIs."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
from PIL import Image

from wsss.io.images import colorize


def mask_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) labels -> blended (H, W, 3) uint8; background and 255 stay visible."""
    colours = colorize(labels).astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels > 0) & (labels != 255)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    ignore = labels == 255
    out[ignore] = 0.5 * out[ignore] + 0.5 * 255  # ignore regions washed out in light grey
    return out.clip(0, 255).astype(np.uint8)


def cam_heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) CAM in [0, 1] -> jet heatmap overlay (H, W, 3) uint8."""
    jet = cv2.applyColorMap((cam.clip(0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return ((1 - alpha) * image.astype(np.float32) + alpha * jet.astype(np.float32)).clip(0, 255).astype(np.uint8)


def fit_height(image: np.ndarray, height: int) -> np.ndarray:
    """Resize to a given height, keeping the aspect ratio (nearest for label-like content)."""
    h, w = image.shape[:2]
    if h == height:
        return image
    return cv2.resize(image, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_NEAREST)


def to_data_uri(image: np.ndarray, fmt: str = "JPEG", quality: int = 88) -> str:
    """Encode an (H, W, 3) uint8 image as a data URI for a self-contained HTML page."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, quality=quality)
    mime = "jpeg" if fmt.upper() == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()
