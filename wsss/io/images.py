"""Bounded, mode-aware image and mask decoding, and index-PNG writing with the VOC palette.

Images are read without applying EXIF orientation on purpose: VOC/COCO masks are aligned with the
stored pixel grid, and rotating only the image would silently misalign them.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.errors import DataError
from wsss.io import atomic

log = logging.getLogger(__name__)

IGNORE = 255  # the label that means 'no label' everywhere in wsss (masks, pseudo masks, losses)
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; larger files are rejected before decoding

# Modes PIL decodes that we convert to RGB under the default "convert" policy, and why.
_CONVERTIBLE = {
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "1": "1-bit",
    "P": "palette",
    "PA": "palette with alpha",
    "RGBA": "RGBA (alpha dropped)",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
}
_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# Image.open itself warns or raises above PIL's default limit; we check our own bound first.
Image.MAX_IMAGE_PIXELS = None


class ConversionLog:
    """Counts images converted to RGB (grayscale, CMYK, ...) so a stage can report them once."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, kind: str, path: Path) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, str(path))

    def summary(self) -> str:
        return "; ".join(f"{n} {kind} image(s) converted to RGB (e.g. {self.examples[kind]})" for kind, n in self.counts.items())


CONVERSIONS = ConversionLog()


def _open_bounded(path: Path, max_pixels: int) -> Image.Image:
    """Open `path`, check its header-declared size against `max_pixels`, then decode the pixels."""
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (corrupt file or unknown format)") from None
    except OSError as e:
        raise DataError(path, f"cannot open image ({e})") from None
    try:
        _check_pixels(path, *img.size, max_pixels)
        # PIL silently decodes 16-bit RGB/RGBA PNGs to 8 bits; the raw mode still tells (read before load()).
        img.info["wsss_high_bit_depth"] = img.mode in _HIGH_BIT_DEPTH or _raw_is_16bit(img)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # PIL warns on some truncated/corrupt files: make it an error
                img.load()
        except (OSError, SyntaxError, ValueError, Warning) as e:
            raise DataError(path, f"corrupt or truncated image ({e})") from None
    except BaseException:
        img.close()  # the header was read from an open file; do not leak it on rejection
        raise
    return img


def _raw_is_16bit(img: Image.Image) -> bool:
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if isinstance(tile, tuple) and not hasattr(tile, "args") else getattr(tile, "args", None)
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def read_image(path: str | Path, mode_policy: str = "convert", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to RGB uint8, shape (H, W, 3).

    mode_policy "convert": grayscale/palette/RGBA/CMYK images are converted to RGB (counted in CONVERSIONS);
    "strict": anything but 8-bit RGB is an error. High bit-depth images are always an error, because
    mapping them to 8 bits needs a choice only the user can make.
    """
    path = Path(path)
    img = _open_bounded(path, max_pixels)
    if img.info.get("wsss_high_bit_depth"):
        raise DataError(path, f"high bit-depth image (16 bits or more per channel, PIL mode {img.mode}); "
                              "convert it to 8-bit RGB first")
    if img.mode != "RGB":
        kind = _CONVERTIBLE.get(img.mode, f"mode {img.mode}")
        if mode_policy == "strict":
            raise DataError(path, f"{kind} image; expected 8-bit RGB (set data.image_mode=convert to convert it)")
        CONVERSIONS.add(kind, path)
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(path, f"decoded to shape {arr.shape}, expected H x W x 3")
    return arr


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except UnidentifiedImageError:  # the same words as when decoding (_open_bounded)
        raise DataError(path, "not a readable image (corrupt file or unknown format)") from None
    except OSError as e:
        raise DataError(path, f"cannot open image ({e})") from None
    _check_pixels(path, w, h, max_pixels)
    return h, w


def _check_pixels(path: Path, w: int, h: int, max_pixels: int) -> None:
    if max_pixels and w * h > max_pixels:
        raise DataError(path, f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                              "(possible decompression bomb; raise data.max_pixels if the file is genuine)")


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, shape (256, 3) uint8; index 255 is the light 'void' colour."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


_PALETTE = voc_palette()


def read_index_png(
    path: str | Path,
    num_classes: int,
    expected_hw: tuple[int, int] | None = None,
    what: str = "mask",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    against: str = "its image",
) -> np.ndarray:
    """Read a label map (index/palette PNG, or RGB in the VOC palette) as uint8 (H, W) in {0..C-1, 255}.

    `expected_hw` is the size of `against` (named in the error when the sizes differ)."""
    path = Path(path)
    img = _open_bounded(path, max_pixels)
    if img.mode in ("P", "L", "1"):
        arr = np.asarray(img.convert("L") if img.mode == "1" else img, dtype=np.uint8)
        if img.mode == "1":
            arr = (arr > 0).astype(np.uint8)
    elif img.mode in ("RGB", "RGBA") and not img.info.get("wsss_high_bit_depth"):
        arr = _rgb_to_index(np.asarray(img.convert("RGB")), path, what)
    elif img.mode in ("RGB", "RGBA"):
        raise DataError(path, f"{what} is a 16-bit {img.mode} image; expected an 8-bit index or palette PNG")
    elif img.mode in _HIGH_BIT_DEPTH:
        raw = np.asarray(img)
        if raw.max(initial=0) > 255 or raw.min(initial=0) < 0:
            raise DataError(path, f"{what} has values outside 0..255 (PIL mode {img.mode})")
        arr = raw.astype(np.uint8)
    else:
        raise DataError(path, f"{what} has unsupported PIL mode {img.mode}; expected an index or palette PNG")
    if expected_hw is not None and arr.shape != tuple(expected_hw):
        raise DataError(path, f"{what} size {arr.shape[1]}x{arr.shape[0]} (WxH) differs from {against} "
                              f"{expected_hw[1]}x{expected_hw[0]}")
    bad = np.unique(arr[(arr >= num_classes) & (arr != IGNORE)])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8])
        raise DataError(path, f"{what} has values {{{shown}}} outside the class range 0..{num_classes - 1} (and 255 = ignore)")
    return arr


def _rgb_to_index(rgb: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Map an RGB image drawn in the VOC palette back to class indices."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    pal_code = (_PALETTE[:, 0].astype(np.int32) << 16) | (_PALETTE[:, 1].astype(np.int32) << 8) | _PALETTE[:, 2]
    lut = {int(c): i for i, c in reversed(list(enumerate(pal_code)))}
    uniq, inv = np.unique(code, return_inverse=True)
    idx = np.empty(len(uniq), dtype=np.int32)
    for k, c in enumerate(uniq):
        if int(c) not in lut:
            r, g, b = (int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255
            raise DataError(path, f"RGB {what} contains colour ({r},{g},{b}) that is not in the VOC palette; "
                                  "save masks as index (or palette) PNGs")
        idx[k] = lut[int(c)]
    return idx[inv].reshape(code.shape).astype(np.uint8)


def read_saliency(path: str | Path, expected_hw: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a saliency map (grayscale PNG/JPEG, 0..255) as float32 (H, W) in [0, 1]."""
    path = Path(path)
    img = _open_bounded(path, max_pixels)
    if img.mode in _HIGH_BIT_DEPTH:
        raw = np.asarray(img).astype(np.float32)
        sal = raw / 65535.0 if raw.max(initial=0) > 255 else raw / 255.0
    else:
        sal = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if expected_hw is not None and sal.shape != tuple(expected_hw):
        raise DataError(path, f"saliency size {sal.shape[1]}x{sal.shape[0]} differs from its image {expected_hw[1]}x{expected_hw[0]}")
    return sal


def encode_index_png(labels: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 label map as a palette PNG (index values preserved, VOC colours)."""
    import io

    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_index_png(path: str | Path, labels: np.ndarray) -> None:
    """Atomically write a (H, W) uint8 label map as a VOC-palette index PNG."""
    atomic.write_bytes(path, encode_index_png(labels))


def write_rgb_png(path: str | Path, rgb: np.ndarray) -> None:
    """Atomically write an (H, W, 3) uint8 image as PNG."""
    atomic.write_with(path, lambda f: Image.fromarray(rgb.astype(np.uint8)).save(f, format="PNG"))


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 VOC colours."""
    return _PALETTE[labels]


def write_gray_png(path: str | Path, gray: np.ndarray) -> None:
    """Atomically write an (H, W) uint8 map (e.g. saliency 0..255) as an 8-bit grayscale PNG."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 map, got {gray.shape} {gray.dtype}")
    atomic.write_with(path, lambda f: Image.fromarray(gray, mode="L").save(f, format="PNG"))
