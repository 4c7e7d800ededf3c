"""Scribble data: a seeded scribble simulator, a data-set wrapper that uses it, and a ScribbleSup converter.

A scribble map follows the sample convention of `wsss.data.base`: (H, W) uint8 holding the class
index on scribble pixels and 255 everywhere else.

Simulated scribbles are derived from ground-truth masks. Anything trained or reported on them must
say so (`SimulatedScribbles.scribbles_simulated` is there for reports to check).
See docs/scribbles_data.md for the algorithm and the measured statistics.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import cv2
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from skimage.morphology import skeletonize

from wsss.data.base import IGNORE, SegDataset, Sample
from wsss.errors import ConfigError, DataError
from wsss.io import images
from wsss.io.paths import check_sample_id

log = logging.getLogger(__name__)

__all__ = [
    "SIMULATOR_VERSION", "simulate_scribbles", "scribble_seed", "SimulatedScribbles",
    "SCRIBBLESUP_ALIASES", "ScribbleSupSummary", "read_scribblesup_xml", "render_scribbles", "convert_scribblesup",
]

# ---- the simulator ----------------------------------------------------------------------------

SIMULATOR_VERSION = 1  # bump when simulate_scribbles' output changes, so caches of its output are not reused
_MAX_SCALE = 4  # skeletons of thick regions are computed on a grid up to 4x coarser (speed)
_MIN_HALF_WIDTH = 6  # ... but only while the thickest part keeps >= 6 coarse pixels of half-width
_MAX_FILLS = 2  # extra skeleton passes when the first skeleton cannot carry the budget
_MAX_ROUNDS = 6  # rounds of "peel off the longest path" when splitting a skeleton into strokes
_LENGTH_JITTER = (0.8, 1.2)  # per-stroke random factor on the planned length (seeded)
_NO_PRED = -9999  # scipy's "no predecessor" marker


@dataclass
class _Stroke:
    """A candidate stroke: an ordered polyline along a skeleton, in full-resolution pixels."""

    cls: int
    pts: np.ndarray  # (n, 2) int (y, x) vertices, consecutive ones at most scale * sqrt(2) apart
    arc: np.ndarray  # (n,) float cumulative length in pixels, arc[0] = 0
    must: bool  # the main stroke of a component that must be scribbled

    @property
    def length(self) -> float:
        return float(self.arc[-1])


def simulate_scribbles(mask: np.ndarray, fraction: float = 0.03, width: int = 3, seed: int = 0, *,
                       min_pixels: int = 10, min_area: float = 0.001, min_branch: float = 10.0,
                       ignore_index: int = IGNORE) -> np.ndarray:
    """Simulate human-like scribbles from a label mask: (H, W) uint8 -> (H, W) uint8, 255 = unlabelled.

    Strokes follow the pruned skeleton (medial axis) of every class region, drawn `width` pixels wide
    and clipped to the region, so a scribble pixel always carries its pixel's true class and never lies
    on `ignore_index`. Each connected component of at least `min_area` x H x W pixels gets its main
    stroke (the longest path through its skeleton), as does the largest component of every class with
    at least `min_pixels` pixels, however small (a short stroke or a dot). Main strokes are shortened
    when they alone exceed the budget of `fraction` x H x W labelled pixels; otherwise side branches
    of at least `min_branch` pixels are added, longest first, until the budget is met. If the whole
    pruned skeleton is too short (large blobby regions), up to two more passes add strokes along the
    skeleton of what is left of each region away from the strokes so far. The fraction is a target
    (within about 5%); a mask that runs out of skeleton stays below it.
    Deterministic for (mask, fraction, width, seed); the seed varies stroke lengths and positions.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be a 2-D integer array, got {mask.dtype} {mask.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    h, w = mask.shape
    out = np.full((h, w), IGNORE, np.uint8)
    if mask.dtype == np.uint8:  # the usual case; bincount is much faster than unique
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(mask, return_counts=True)
    keep = values != ignore_index
    values, counts = values[keep], counts[keep]
    if values.size and (values.min() < 0 or values.max() >= IGNORE):
        raise ValueError(f"mask classes must be in 0..254 (and {ignore_index} = ignore), got {values.tolist()}")
    min_area_px = max(min_pixels, min_area * h * w)
    regions: dict[int, np.ndarray] = {}
    strokes: list[_Stroke] = []
    for c, n in zip(values.tolist(), counts.tolist()):
        if n < min_pixels:
            continue  # a few stray pixels are an annotation artefact, not something one scribbles on
        region = mask == c
        regions[c] = region
        strokes += _class_strokes(region, c, min_area_px, min_branch)
    if not strokes:
        return out

    # Random draws happen in a fixed order (one per stroke), so the result is deterministic.
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(*_LENGTH_JITTER, len(strokes))
    offset = rng.triangular(0.0, 0.5, 1.0, len(strokes))  # where a shortened stroke sits along its path
    budget = fraction * h * w
    best = (out, 0)
    for fill in range(_MAX_FILLS + 1):
        out, got = _fit(strokes, budget, width, jitter, offset, regions, min_branch)
        if fill == 0 or abs(got - budget) < abs(best[1] - budget):
            best = (out, got)
        if got >= 0.95 * budget or fill == _MAX_FILLS:
            break
        # The whole pruned skeleton is drawn and still short of the budget (large blobby regions): add
        # strokes along the skeleton of what each region has left away from the strokes drawn so far.
        extra = []
        for c, region in regions.items():
            free = region & ~(cv2.dilate((out == c).astype(np.uint8), _disk(3 * width)) > 0)
            if free.any():
                extra += _class_strokes(free, c, min_area_px, min_branch)
        if not extra:
            break
        for e in extra:
            e.must = False
        strokes += extra
        jitter = np.concatenate([jitter, rng.uniform(*_LENGTH_JITTER, len(extra))])
        offset = np.concatenate([offset, rng.triangular(0.0, 0.5, 1.0, len(extra))])
    return best[0]


def _fit(strokes: list[_Stroke], budget: float, width: int, jitter: np.ndarray, offset: np.ndarray,
         regions: dict[int, np.ndarray], min_branch: float) -> tuple[np.ndarray, int]:
    """Plan and draw the strokes to cover about `budget` pixels: ((H, W) scribble map, labelled pixels)."""
    hw = next(iter(regions.values())).shape
    target, keep = budget, None
    best: tuple[np.ndarray, int] = (np.full(hw, IGNORE, np.uint8), 0)
    for _ in range(3):  # the footprint estimate ignores overlaps and clipping: re-plan with the measured ratio
        new_keep = _plan(strokes, target, width, jitter, min_branch)
        if keep is not None and np.array_equal(new_keep, keep):
            break
        keep = new_keep
        out = _draw(strokes, keep, offset, regions, width, hw)
        got = int(np.count_nonzero(out != IGNORE))
        if abs(got - budget) < abs(best[1] - budget) or best[1] == 0:
            best = (out, got)
        if got == 0 or abs(got - budget) <= 0.05 * budget:
            break
        target *= budget / got
    return best


def scribble_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed from the run seed and a stable hash of the id (not Python's salted hash)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(sample_id.encode("utf-8"))])
    return int(state.generate_state(1)[0])


def _class_strokes(region: np.ndarray, cls: int, min_area_px: float, min_branch: float) -> list[_Stroke]:
    """Candidate strokes of one class region: one main stroke per kept component, then side branches."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = areas >= min_area_px
    kept[int(np.argmax(areas))] = True  # every class keeps its largest piece, however small
    ids = np.flatnonzero(kept) + 1  # small fragments (bits between void borders) get no scribble
    strokes = _component_strokes(labels, stats, ids, cls, min_branch, None)
    missing = set(ids.tolist()) - {int(labels[s.pts[0, 0], s.pts[0, 1]]) for s in strokes if s.must}
    for comp in sorted(missing):  # too thin for the coarse grid: redo at full resolution
        strokes += _component_strokes(labels, stats, np.array([comp]), cls, min_branch, 1)
    return strokes


def _component_strokes(labels: np.ndarray, stats: np.ndarray, ids: np.ndarray, cls: int, min_branch: float,
                       scale: Optional[int]) -> list[_Stroke]:
    """Strokes along the skeleton of the components `ids` of a label image (cropped to their box)."""
    x0 = int(stats[ids, cv2.CC_STAT_LEFT].min())
    y0 = int(stats[ids, cv2.CC_STAT_TOP].min())
    x1 = int((stats[ids, cv2.CC_STAT_LEFT] + stats[ids, cv2.CC_STAT_WIDTH]).max())
    y1 = int((stats[ids, cv2.CC_STAT_TOP] + stats[ids, cv2.CC_STAT_HEIGHT]).max())
    lab = labels[y0:y1, x0:x1]
    wanted = np.zeros(len(stats), bool)
    wanted[ids] = True
    crop = wanted[lab]
    if scale is None:
        # Thinning costs one pass per pixel of thickness: thick regions are thinned on a coarser grid.
        padded = np.pad(crop, 1).astype(np.uint8)  # outside the crop is outside the region (as for skeletonize)
        half_width = float(cv2.distanceTransform(padded, cv2.DIST_L2, 3).max())
        scale = 1
        while scale < _MAX_SCALE and half_width >= 2 * scale * _MIN_HALF_WIDTH:
            scale *= 2
    strokes: list[_Stroke] = []
    main: dict[int, int] = {}  # component -> index of its longest first-round path
    for rnd, pts, arc in _skeleton_paths(crop, scale, min_branch):
        pts = pts + np.array([y0, x0])
        s = _Stroke(cls, pts, arc, False)
        if rnd == 0:
            comp = int(labels[pts[0, 0], pts[0, 1]])
            if comp not in main or s.length > strokes[main[comp]].length:
                main[comp] = len(strokes)
        strokes.append(s)
    for i in main.values():
        strokes[i].must = True
    # other pieces must be long enough to be worth a stroke
    return [s for s in strokes if s.must or s.length >= min_branch]


def _skeleton_paths(region: np.ndarray, scale: int, min_branch: float) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Split the skeleton of a binary region into paths: [(round, (n, 2) int y/x points, (n,) arc length)].

    Round 0 holds the longest path of every skeleton piece; each later round removes the paths found so far
    and takes the longest path of what is left, so long branches come before short spurs.
    """
    if scale > 1:
        h, w = region.shape
        hp, wp = -(-h // scale) * scale, -(-w // scale) * scale
        blocks = np.zeros((hp, wp), bool)
        blocks[:h, :w] = region
        # a coarse pixel is inside only if its whole block is: its centre then lies inside the region
        region = blocks.reshape(hp // scale, scale, wp // scale, scale).all(axis=(1, 3))
    skel = skeletonize(region)
    ys, xs = np.nonzero(skel)
    if ys.size == 0:
        return []
    r, c, wt = _pixel_edges(ys, xs, skel.shape)
    alive = np.ones(ys.size, bool)
    found = []
    for rnd in range(_MAX_ROUNDS):
        nodes = np.flatnonzero(alive)
        renum = np.cumsum(alive) - 1  # old node -> index among the alive ones
        e = alive[r] & alive[c]
        graph = csr_matrix((wt[e], (renum[r[e]], renum[c[e]])), shape=(nodes.size, nodes.size))
        paths, comp = _longest_paths(graph)
        used = np.zeros(nodes.size, bool)
        spent = np.zeros(len(paths), bool)  # pieces whose longest path is short: so is everything in them
        for k, path in enumerate(paths):
            idx = nodes[path]
            pts = np.stack([ys[idx] * scale + scale // 2, xs[idx] * scale + scale // 2], axis=1)
            if scale > 1:
                pts = _smooth(pts)
            arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
            long_enough = arc[-1] >= min_branch
            if rnd == 0 or long_enough:
                found.append((rnd, pts, arc))
                used[path] = True
            spent[k] = not long_enough
        used |= spent[comp]
        alive[nodes[used]] = False
        if not alive.any():
            break
    return found


def _smooth(pts: np.ndarray) -> np.ndarray:
    """Moving average (5 vertices) of a path's interior points: removes the staircase of a coarse grid.

    The end points stay exact (they are looked up in the label image); clipping to the region when
    drawing takes care of any smoothed point that leaves it.
    """
    if len(pts) < 5:
        return pts
    kernel = np.full(5, 0.2)
    out = pts.copy()
    for d in range(2):
        out[2:-2, d] = np.round(np.convolve(pts[:, d], kernel, "valid")).astype(pts.dtype)
    return out


def _pixel_edges(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-neighbour edges between the given pixels, one direction each: (from, to, step length 1 or sqrt 2)."""
    n = ys.size
    index = np.full(shape, -1, np.int64)
    index[ys, xs] = np.arange(n)
    rows, cols, weights = [], [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        y2, x2 = ys + dy, xs + dx
        ok = (y2 < shape[0]) & (x2 >= 0) & (x2 < shape[1])
        j = np.full(n, -1, np.int64)
        j[ok] = index[y2[ok], x2[ok]]
        src = np.flatnonzero(j >= 0)
        rows.append(src)
        cols.append(j[src])
        weights.append(np.full(src.size, math.hypot(dy, dx)))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)


def _longest_paths(graph: csr_matrix) -> tuple[list[np.ndarray], np.ndarray]:
    """Approximate longest path of every connected piece (two sweeps): ([node indices per piece], piece per node)."""
    _, comp = connected_components(graph, directed=False)
    _, first = np.unique(comp, return_index=True)
    dist = dijkstra(graph, directed=False, indices=first, min_only=True)
    far = _argmax_per_group(dist, comp)
    dist, pred, _ = dijkstra(graph, directed=False, indices=far, min_only=True, return_predecessors=True)
    ends = _argmax_per_group(dist, comp)
    paths = []
    for end in ends:
        path = [int(end)]
        while pred[path[-1]] != _NO_PRED:
            path.append(int(pred[path[-1]]))
        paths.append(np.array(path))
    return paths, comp


def _argmax_per_group(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Index of the largest value in each group 0..G-1 (ties: the later index), in group order."""
    order = np.lexsort((values, group))
    last = np.flatnonzero(np.diff(group[order])).tolist() + [order.size - 1]
    return order[last]


def _footprint(length: np.ndarray | float, width: int) -> np.ndarray | float:
    """Estimated pixels of a stroke of the given path length: body plus round caps."""
    return length * width + width * width


def _plan(strokes: list[_Stroke], budget: float, width: int, jitter: np.ndarray, min_branch: float) -> np.ndarray:
    """Length to draw of every stroke (-1 = not drawn) so the estimated footprint meets `budget`."""
    length = np.array([s.length for s in strokes])
    must = np.array([s.must for s in strokes])
    keep = np.full(length.size, -1.0)
    natural = length * np.minimum(1.0, jitter)  # strokes rarely run all the way to a region's tips
    if _footprint(natural[must], width).sum() >= budget:
        # Main strokes alone exceed the budget: shorten all of them by a common factor t (found by
        # bisection), keeping at least a short stroke (or the dot of a tiny region) each.
        floor = np.minimum(length[must], 2.0 * width)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            t = 0.5 * (lo + hi)
            k = np.clip(length[must] * np.minimum(1.0, t * jitter[must]), floor, length[must])
            lo, hi = (t, hi) if _footprint(k, width).sum() < budget else (lo, t)
        keep[must] = np.clip(length[must] * np.minimum(1.0, lo * jitter[must]), floor, length[must])
        return keep
    keep[must] = natural[must]
    left = budget - _footprint(natural[must], width).sum()
    optional = np.flatnonzero(~must)
    for i in optional[np.argsort(-length[optional], kind="stable")]:  # long branches first
        if left <= 0:
            break
        cost = _footprint(natural[i], width)
        if cost <= left:
            keep[i], left = natural[i], left - cost
        elif (k := (left - width * width) / width) >= 2 * width:  # the rest of the budget, if worth a stroke
            keep[i], left = k, 0.0
    return keep


def _draw(strokes: list[_Stroke], keep: np.ndarray, offset: np.ndarray, regions: dict[int, np.ndarray],
          width: int, hw: tuple[int, int]) -> np.ndarray:
    """Render the planned strokes: (H, W) uint8, class on stroke pixels inside its own region, 255 elsewhere."""
    out = np.full(hw, IGNORE, np.uint8)
    kernel = _disk(width)
    for cls, region in regions.items():
        canvas = np.zeros(hw, np.uint8)
        for s, k, o in zip(strokes, keep, offset):
            if s.cls != cls or k < 0:
                continue
            start = o * (s.length - k)
            i0 = int(np.searchsorted(s.arc, start, "left"))
            i1 = int(np.searchsorted(s.arc, start + k, "right"))
            if i1 <= i0:  # shorter than one vertex step: a dot at the middle
                i0 = int(np.argmin(np.abs(s.arc - (start + k / 2))))
                i1 = i0 + 1
            pts = s.pts[i0:i1, ::-1].astype(np.int32)  # cv2 wants (x, y)
            if len(pts) == 1:
                canvas[pts[0, 1], pts[0, 0]] = 1
            else:
                cv2.polylines(canvas, [pts], False, 1, 1, cv2.LINE_8)
        if canvas.any():
            # clipping to the region is what guarantees that no scribble pixel carries a wrong class
            out[(cv2.dilate(canvas, kernel) > 0) & region] = cls
    return out


def _disk(width: int) -> np.ndarray:
    """A (width, width) uint8 disk of diameter `width` (3 -> the full 3x3 square, like a 3-px pen)."""
    c = (width - 1) / 2
    yy, xx = np.mgrid[0:width, 0:width]
    return (((yy - c) ** 2 + (xx - c) ** 2) <= (width / 2) ** 2).astype(np.uint8)


# ---- a data set with simulated scribbles --------------------------------------------------------

class SimulatedScribbles(SegDataset):
    """A data set whose scribbles are simulated from its ground-truth masks; everything else is the wrapped set's.

    Sample `sid` gets `simulate_scribbles(mask, fraction, width, scribble_seed(seed, sid))`, so scribbles are
    the same in every epoch, process and run for the same seed. `ids`, `skipped` and `skip_bad` belong
    to the wrapper (so `check` and `subset` work on it); loaders and other attributes are the wrapped set's.
    """

    scribbles_simulated = True  # reports must say that scribbles were simulated from ground truth

    def __init__(self, base: SegDataset, fraction: float = 0.03, width: int = 3, seed: int = 0):
        ids = list(base.ids)
        if isinstance(base, SimulatedScribbles):  # re-wrapping replaces the settings, it does not stack
            base = base.base
        if base.ids and not base.has_masks:
            raise DataError(None, f"data.scribbles.source=simulate draws scribbles from ground-truth masks, but the "
                                  f"{type(base).__name__} data set has none; use a data set with masks or "
                                  "real scribbles (data.scribble_dir)")
        if not 0.0 <= fraction <= 1.0 or width < 1:
            raise ConfigError(f"data.scribbles: need 0 <= fraction <= 1 and width >= 1, got fraction={fraction}, "
                              f"width={width}")
        # SegDataset.__init__ is not called: class names, limits and loaders stay the wrapped set's.
        self.base = base
        self.fraction, self.width, self.seed = float(fraction), int(width), int(seed)
        self.ids = ids
        self.skipped = dict(base.skipped)
        self.skip_bad = base.skip_bad

    @classmethod
    def wrap(cls, ds: SegDataset, cfg: Any) -> "SimulatedScribbles":
        """Wrap `ds` with the settings of a `ScribbleConfig` (fraction, width, seed)."""
        return cls(ds, fraction=cfg.fraction, width=cfg.width, seed=cfg.seed)

    def __repr__(self) -> str:
        return (f"SimulatedScribbles({type(self.base).__name__}, {len(self.ids)} ids, fraction={self.fraction}, "
                f"width={self.width}, seed={self.seed})")

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the wrapper lacks (adapter-specific ones such as `dir` or `root`)
        if name.startswith("__") or name == "base":  # no recursion while unpickling
            raise AttributeError(name)
        return getattr(self.base, name)

    # ---- delegated settings and loaders ----------------------------------------------------------
    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return self.base.class_names

    @property
    def image_mode(self) -> str:  # type: ignore[override]
        return self.base.image_mode

    @property
    def max_pixels(self) -> int:  # type: ignore[override]
        return self.base.max_pixels

    @property
    def allow_empty_labels(self) -> bool:  # type: ignore[override]
        return self.base.allow_empty_labels

    @property
    def has_masks(self) -> bool:
        return self.base.has_masks

    @property
    def has_saliency(self) -> bool:
        return self.base.has_saliency

    @property
    def has_scribbles(self) -> bool:
        return bool(self.ids)

    def image_path(self, sample_id: str) -> Path:
        return self.base.image_path(sample_id)

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return self.base.mask_path(sample_id)

    def scribble_path(self, sample_id: str) -> Optional[Path]:
        return None  # scribbles are computed, not read

    def saliency_path(self, sample_id: str) -> Optional[Path]:
        return self.base.saliency_path(sample_id)

    def _load_labels(self, sample_id: str) -> np.ndarray:
        return self.base._load_labels(sample_id)

    def load_image(self, sample_id: str) -> np.ndarray:
        return self.base.load_image(sample_id)

    def load_mask(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        return self.base.load_mask(sample_id, hw)

    def load_saliency(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        return self.base.load_saliency(sample_id, hw)

    def load_labels(self, sample_id: str) -> np.ndarray:
        return self.base.load_labels(sample_id)

    # ---- the simulated part ----------------------------------------------------------------------
    def load_scribble(self, sample_id: str, hw: tuple[int, int] | None = None) -> Optional[np.ndarray]:
        """(H, W) uint8 simulated scribbles of one sample (255 = unlabelled)."""
        return self.simulate(sample_id, self._source_mask(sample_id, hw))

    def simulate(self, sample_id: str, mask: np.ndarray) -> np.ndarray:
        """Simulated scribbles of `sample_id` from its (H, W) mask."""
        return simulate_scribbles(mask, self.fraction, self.width, scribble_seed(self.seed, sample_id))

    def load(self, sample_id: str,
             parts: Iterable[str] = ("image", "labels", "mask", "scribble", "saliency")) -> Sample:
        """The wrapped set's sample, with simulated scribbles; the mask is returned only if asked for."""
        parts = set(parts)
        sample = self.base.load(sample_id, parts - {"scribble"})
        if "scribble" in parts:
            mask = sample.get("mask")
            if mask is None:  # not requested: read it for the simulation only, never hand it out
                hw = sample["image"].shape[:2] if "image" in sample else self._image_hw(sample_id)
                mask = self._source_mask(sample_id, hw)
            sample["scribble"] = self.simulate(sample_id, mask)
        return sample

    def _source_mask(self, sample_id: str, hw: tuple[int, int] | None) -> np.ndarray:
        mask = self.base.load_mask(sample_id, hw)
        if mask is None:
            raise DataError(self.base.mask_path(sample_id),
                            f"{sample_id}: no ground-truth mask to simulate scribbles from")
        return mask

    def _image_hw(self, sample_id: str) -> tuple[int, int] | None:
        """Image size from the file header, to check the mask against (as SegDataset.load does for scribbles)."""
        try:
            return images.image_size(self.base.image_path(sample_id), self.max_pixels)
        except NotImplementedError:  # a set without image files: nothing to check against
            return None


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
    kernel = _disk(width)
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
