"""ScribbleSup annotations (XML polylines) -> index PNG scribbles (`wsss data scribblesup`)."""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

import cv2
import numpy as np

from wsss.data.base import IGNORE
from wsss.errors import DataError
from wsss.data.scribble_sim import disk_kernel
from wsss.io import images
from wsss.io.paths import check_sample_id

log = logging.getLogger(__name__)

__all__ = ["SCRIBBLESUP_ALIASES", "ScribbleSupSummary", "read_scribblesup_xml", "render_scribbles", "convert_scribblesup"]

# ---- ScribbleSup XML --------------------------------------------------------------------------

# ScribbleSup's <tag> names that differ from the PASCAL VOC devkit names (wsss.data.classes.VOC_CLASSES).
SCRIBBLESUP_ALIASES: dict[str, str] = {
    "plane": "aeroplane",
    "bike": "bicycle",
    "table": "diningtable",
    "plant": "pottedplant",
    "monitor": "tvmonitor",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class ScribbleSupSummary:
    """What `convert_scribblesup` did."""

    written: int = 0  # index PNGs written
    labelled_pixels: int = 0  # scribble pixels over all written files
    total_pixels: int = 0  # all pixels of the written files
    clipped_points: int = 0  # points slightly outside their image (within `margin`), drawn clipped
    empty: list[str] = field(default_factory=list)  # files written with no scribble pixel
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> error (skip_bad=True only)

    @property
    def labelled_fraction(self) -> float:
        """Labelled pixels / all pixels, over the written files."""
        return self.labelled_pixels / self.total_pixels if self.total_pixels else 0.0

    def __str__(self) -> str:
        text = (f"{self.written} scribble map(s) written, {100 * self.labelled_fraction:.2f}% of pixels labelled"
                f", {self.clipped_points} point(s) clipped at the image border")
        if self.empty:
            text += f", {len(self.empty)} without any scribble (e.g. {self.empty[0]})"
        if self.skipped:
            name, err = next(iter(self.skipped.items()))
            text += f", {len(self.skipped)} skipped (e.g. {err})"
        return text


def _class_index(class_names: list[str], aliases: Mapping[str, str] | None) -> dict[str, int]:
    """Lower-case tag -> class index, from the class names plus aliases that name a known class."""
    index = {n.lower(): i for i, n in enumerate(class_names)}
    for alias, name in (SCRIBBLESUP_ALIASES if aliases is None else aliases).items():
        if name.lower() in index:
            index.setdefault(alias.lower(), index[name.lower()])
    return index


def _int_text(el: ET.Element | None, what: str, path: Path) -> int:
    if el is None or el.text is None or not el.text.strip():
        raise DataError(path, f"missing {what}")
    try:
        value = float(el.text.strip())
    except ValueError:
        raise DataError(path, f"{what} is {el.text.strip()!r}, not a number") from None
    if not math.isfinite(value):
        raise DataError(path, f"{what} is {el.text.strip()!r}, not a finite number")
    return int(round(value))


def read_scribblesup_xml(path: str | Path, class_index: Mapping[str, int]
                         ) -> tuple[Optional[tuple[int, int]], list[tuple[int, np.ndarray]]]:
    """Parse one ScribbleSup XML file: ((H, W) from <size> or None, [(class, (n, 2) int x/y points), ...]).

    `class_index` maps lower-case <tag> names to class indices. Polygons without points are skipped.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(path, f"malformed XML ({e})") from None
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror or e})") from None
    size = None
    if (size_el := root.find("size")) is not None:
        w = _int_text(size_el.find("width"), "<size><width>", path)
        h = _int_text(size_el.find("height"), "<size><height>", path)
        if w <= 0 or h <= 0:
            raise DataError(path, f"<size> is {w}x{h}")
        size = (h, w)
    scribbles = []
    for i, poly in enumerate(root.iter("polygon"), 1):
        tag_el = poly.find("tag")
        tag = (tag_el.text or "").strip() if tag_el is not None else ""
        if not tag:
            raise DataError(path, f"<polygon> #{i} has no <tag> (class name)")
        if tag.lower() not in class_index:
            known = ", ".join(sorted(class_index))
            raise DataError(path, f"<polygon> #{i} has unknown class {tag!r}; known names: {known}")
        pts = [(_int_text(p.find("X"), f"<polygon> #{i} <point><X>", path),
                _int_text(p.find("Y"), f"<polygon> #{i} <point><Y>", path)) for p in poly.iter("point")]
        if pts:
            scribbles.append((class_index[tag.lower()], np.array(pts, np.int64)))
    return size, scribbles


def render_scribbles(scribbles: list[tuple[int, np.ndarray]], hw: tuple[int, int], width: int = 3,
                     margin: int = 2, source: str | Path | None = None) -> tuple[np.ndarray, int]:
    """Draw polylines [(class, (n, 2) x/y points)] `width` px wide: ((H, W) uint8 map, 255 elsewhere; clipped points).

    Later scribbles overwrite earlier ones where they cross (as the rloss converter does). Points up to
    `margin` px outside the image are accepted and clipped; farther ones are a DataError naming `source`.
    """
    h, w = hw
    out = np.full((h, w), IGNORE, np.uint8)
    kernel = disk_kernel(width)
    clipped = 0
    for i, (cls, pts) in enumerate(scribbles, 1):
        x, y = pts[:, 0], pts[:, 1]
        outside = (x < 0) | (y < 0) | (x >= w) | (y >= h)
        far = (x < -margin) | (y < -margin) | (x >= w + margin) | (y >= h + margin)
        if far.any():
            j = int(np.argmax(far))
            raise DataError(source, f"<polygon> #{i} has point ({x[j]}, {y[j]}) outside the {w}x{h} image "
                                    f"(more than {margin} px); wrong image or corrupt file?")
        clipped += int(outside.sum())
        canvas = np.zeros((h, w), np.uint8)
        xy = pts.astype(np.int32)
        if len(xy) == 1 or (xy == xy[0]).all():
            cv2.line(canvas, tuple(map(int, xy[0])), tuple(map(int, xy[0])), 1, 1, cv2.LINE_8)
        else:
            cv2.polylines(canvas, [xy], False, 1, 1, cv2.LINE_8)  # 1-px path; cv2 clips at the border
        out[cv2.dilate(canvas, kernel) > 0] = cls
    return out, clipped


def _find_image(image_dir: Path, sample_id: str) -> Optional[Path]:
    for suffix in IMAGE_SUFFIXES:
        if (p := image_dir / f"{sample_id}{suffix}").is_file():
            return p
    return None


def convert_scribblesup(xml_dir: str | Path, image_dir: str | Path, out_dir: str | Path, class_names: list[str], *,
                        width: int = 3, margin: int = 2, aliases: Mapping[str, str] | None = None,
                        skip_bad: bool = False, progress: bool = False) -> ScribbleSupSummary:
    """Convert ScribbleSup XML files (`<id>.xml`) to index PNGs `out_dir/<id>.png` sized like `image_dir/<id>.jpg`.

    Scribbles are polylines through the listed points, `width` px wide (3, as rloss's convertscribbles.m),
    class index on scribble pixels and 255 elsewhere; files are written atomically. <tag> names are matched
    to `class_names` case-insensitively, with `aliases` (default SCRIBBLESUP_ALIASES: plane -> aeroplane, ...).
    Any bad file (malformed XML, unknown class, points far outside the image, missing image, <size> not
    matching the image) raises a DataError naming it; with `skip_bad` it is listed in the summary instead.
    """
    xml_dir, image_dir, out_dir = Path(xml_dir), Path(image_dir), Path(out_dir)
    if not xml_dir.is_dir():
        raise DataError(xml_dir, "scribble XML directory not found")
    if not image_dir.is_dir():
        raise DataError(image_dir, "image directory not found")
    if width < 1 or margin < 0:
        raise ValueError(f"need width >= 1 and margin >= 0, got width={width}, margin={margin}")
    files = sorted(xml_dir.glob("*.xml"))
    if not files:
        raise DataError(xml_dir, "no .xml files (expected ScribbleSup annotations such as pascal_2012/<id>.xml)")
    class_index = _class_index(list(class_names), aliases)
    summary = ScribbleSupSummary()
    it: Iterable[Path] = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="converting scribbles", leave=False, disable=None)
    for xml in it:
        try:
            sid = check_sample_id(xml.stem, xml)
            image = _find_image(image_dir, sid)
            if image is None:
                raise DataError(xml, f"no image {sid}.jpg (or .jpeg/.png) in {image_dir}")
            hw = images.image_size(image)
            size, scribbles = read_scribblesup_xml(xml, class_index)
            if size is not None and size != hw:
                raise DataError(xml, f"<size> is {size[1]}x{size[0]} but the image {image} is {hw[1]}x{hw[0]} (WxH)")
            label, clipped = render_scribbles(scribbles, hw, width, margin, xml)
        except DataError as e:
            if not skip_bad:
                raise
            summary.skipped[xml.name] = str(e)
            continue
        images.write_index_png(out_dir / f"{sid}.png", label)
        n = int(np.count_nonzero(label != IGNORE))
        summary.written += 1
        summary.labelled_pixels += n
        summary.total_pixels += label.size
        summary.clipped_points += clipped
        if n == 0:
            summary.empty.append(xml.name)
    if summary.skipped:
        log.warning("skipped %d bad scribble file(s) of %d; first: %s", len(summary.skipped), len(files),
                    next(iter(summary.skipped.values())))
    return summary
