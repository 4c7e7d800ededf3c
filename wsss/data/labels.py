"""Image-level label files: both common `cls_labels.npy` formats, VOC XML, and CSV/JSON label tables.

Label vectors are (K,) float32 multi-hot over the K = C - 1 foreground classes; entry k is class k + 1.

`cls_labels.npy` formats (a pickled dict saved with np.save):
  "irn": {2007000032: float32[K]}  PSA/IRN/SEAM and descendants; the VOC id with '_' removed, as an int.
  "toco": {"2007_000032": uint8[K]}  ToCo/AFA family; string ids, one-hot uint8.
Pickles can run code, so these files are read with an unpickler that only rebuilds numpy arrays.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import pickle
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

import numpy as np

from wsss.errors import DataError
from wsss.io import atomic
from wsss.io.paths import check_sample_id

if TYPE_CHECKING:
    from wsss.data.base import SegDataset

FORMATS = ("irn", "toco")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

Token = Union[str, int]


# ----------------------------------------------------------------------------------------------
# cls_labels.npy


def _np_core(name: str) -> Any:
    """numpy._core.<name> (numpy >= 1.26), else numpy.core.<name>, without numpy 2's deprecation warning."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, dtypes and scalars and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(_np_core("multiarray"), name)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _np_core("numeric")._frombuffer
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # Python 2 era pickles store bytes this way
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def load_npy_dict(path: str | Path) -> dict:
    """Load a dict saved with `np.save(path, d)`, rebuilding only numpy objects (no arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "label file not found")
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                shape, _, dtype = fmt._read_array_header(f, version)  # no public reader for v3 headers
            if not dtype.hasobject:
                raise DataError(path, f"holds a plain {dtype} array of shape {shape}; expected a dict "
                                      "{image id: label vector} saved with np.save")
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise DataError(path, f"not a readable cls_labels .npy file ({e})") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DataError(path, f"holds a {type(obj).__name__}; expected a dict {{image id: label vector}}")
    return obj


def encode_voc_int_id(sample_id: str) -> int:
    """'2007_000032' -> 2007000032 (the IRN/PSA key)."""
    head, _, tail = sample_id.partition("_")
    if len(head) != 4 or not head.isdigit() or not tail.isdigit():
        raise DataError(None, f"id {sample_id!r} is not a VOC id like 2007_000032, so it has no int key; "
                              "write string keys (format 'toco' / 'str') instead")
    return int(head + tail)


def decode_voc_int_id(key: int) -> str:
    """2007000032 -> '2007_000032'."""
    s = str(int(key))
    return s[:4] + "_" + s[4:]


def read_cls_labels_npy(path: str | Path, num_fg: int) -> dict[str, np.ndarray]:
    """Read either cls_labels.npy format; return {id: (K,) float32 multi-hot}."""
    path = Path(path)
    raw = load_npy_dict(path)
    if not raw:
        raise DataError(path, "label dict is empty")
    int_keys = [k for k in raw if isinstance(k, (int, np.integer)) and not isinstance(k, bool)]
    if int_keys and len(int_keys) != len(raw):
        raise DataError(path, "mixes integer (IRN) and string (ToCo) keys")
    out: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        sid = decode_voc_int_id(key) if int_keys else key
        if not isinstance(sid, str):
            raise DataError(path, f"key {key!r} is neither an int-encoded VOC id nor a string id")
        vec = np.asarray(value)
        if vec.shape != (num_fg,):
            raise DataError(path, f"label of {sid!r} has shape {vec.shape}, expected ({num_fg},) "
                                  f"(one entry per foreground class, background excluded)")
        if not np.isin(vec, (0, 1)).all():
            raise DataError(path, f"label of {sid!r} has values other than 0 and 1: {vec.tolist()}")
        if sid in out:
            raise DataError(path, f"duplicate id {sid!r}")
        out[sid] = vec.astype(np.float32)
    return out


def write_cls_labels_npy(path: str | Path, labels: Mapping[str, np.ndarray], fmt: str = "irn") -> None:
    """Atomically write {id: (K,) multi-hot} as cls_labels.npy in format "irn" (alias "int") or "toco" ("str")."""
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} (or int/str), got {fmt!r}")
    d: dict[Any, np.ndarray] = {}
    for sid, vec in labels.items():
        vec = np.asarray(vec)
        if fmt == "irn":
            d[encode_voc_int_id(sid)] = vec.astype(np.float32)
        else:
            d[sid] = (vec > 0).astype(np.uint8)
    atomic.write_with(path, lambda f: np.save(f, d, allow_pickle=True))


_FORMAT_ALIASES = {"int": "irn", "str": "toco"}


def write_cls_labels(datasets: "SegDataset | Iterable[SegDataset]", path: str | Path, fmt: str = "irn") -> int:
    """Write the image-level labels of every sample of one or more data sets as cls_labels.npy; return the count.

    An id in several data sets (e.g. train and trainval) must have the same labels in each.
    """
    from wsss.data.base import SegDataset

    dss = [datasets] if isinstance(datasets, SegDataset) else list(datasets)
    labels: dict[str, np.ndarray] = {}
    for ds in dss:
        for sid in ds.ids:
            vec = ds.load_labels(sid)
            if sid in labels and not np.array_equal(labels[sid], vec):
                raise DataError(path, f"id {sid!r} has different labels in two of the data sets written")
            labels[sid] = vec
    write_cls_labels_npy(path, labels, fmt)
    return len(labels)


# ----------------------------------------------------------------------------------------------
# VOC XML annotations


def labels_from_voc_xml(path: str | Path, class_names: list[str]) -> np.ndarray:
    """(K,) multi-hot from `Annotations/<id>.xml`: every <object>, difficult and truncated ones included.

    This is what IRN's make_cls_labels.py does (its XML reader keeps any class name it finds and
    ignores the `difficult` flag); object parts (<part><name>head</name>) are not objects.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "annotation XML not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(path, f"not valid XML ({e})") from None
    index = {n: i for i, n in enumerate(class_names)}
    labels = np.zeros(len(class_names) - 1, dtype=np.float32)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or index[name] == 0:
            raise DataError(path, f"unknown class name {name!r} in <object>; known: {', '.join(class_names[1:])}")
        labels[index[name] - 1] = 1.0
    return labels


# ----------------------------------------------------------------------------------------------
# CSV / JSON label tables (the folder data set)

_ID_HEADERS = ("id", "image", "image_id", "filename", "file", "name")


class LabelTable:
    """Raw rows of a labels file: id -> tokens (class names or indices) and where each row came from."""

    def __init__(self, path: Path):
        self.path = path
        self.tokens: dict[str, list[Token]] = {}
        self.where: dict[str, str] = {}

    def add(self, raw_id: Any, tokens: list[Token], where: str) -> None:
        if not isinstance(raw_id, str):
            raise DataError(self.path, f"{where}: image id must be a string, got {raw_id!r}")
        sid = check_sample_id(strip_image_extension(raw_id.strip()), f"{self.path} ({where})")
        if sid in self.tokens:
            raise DataError(self.path, f"{where}: duplicate id {sid!r} (first at {self.where[sid]})")
        self.tokens[sid] = tokens
        self.where[sid] = where

    def names(self) -> list[str]:
        """Every class name used (indices skipped), in first-seen order."""
        seen: dict[str, None] = {}
        for toks in self.tokens.values():
            for t in toks:
                if isinstance(t, str):
                    seen.setdefault(t, None)
        return list(seen)

    def encode(self, sample_id: str, class_names: list[str]) -> np.ndarray:
        """(K,) float32 multi-hot for one id; unknown names and out-of-range indices are DataErrors."""
        return encode_tokens(self.tokens[sample_id], class_names, self.path, f"{self.where[sample_id]} ({sample_id})")


def strip_image_extension(name: str) -> str:
    """'cat_01.jpg' -> 'cat_01'; names without a known image extension are returned unchanged."""
    p = Path(name)
    return name[: -len(p.suffix)] if p.suffix.lower() in IMAGE_EXTENSIONS else name


def encode_tokens(tokens: list[Token], class_names: list[str], source: Path | str, where: str) -> np.ndarray:
    """Class names (case-insensitive) or indices 1..C-1 -> (K,) multi-hot."""
    lookup = {n.lower(): i for i, n in enumerate(class_names)}
    labels = np.zeros(len(class_names) - 1, dtype=np.float32)
    for tok in tokens:
        if isinstance(tok, str) and tok.lower() in lookup:
            idx = lookup[tok.lower()]
        elif isinstance(tok, int) or (isinstance(tok, str) and tok.lstrip("-").isdigit()):
            idx = int(tok)
            if not 1 <= idx < len(class_names):
                raise DataError(source, f"{where}: class index {idx} out of range 1..{len(class_names) - 1} "
                                        f"(0 is background, which is not an image-level label)")
        else:
            raise DataError(source, f"{where}: unknown class name {tok!r}; known: {', '.join(class_names[1:])}")
        if idx == 0:
            raise DataError(source, f"{where}: background ({tok!r}) is not an image-level label")
        labels[idx - 1] = 1.0
    return labels


def read_label_table(path: str | Path) -> LabelTable:
    """Read a labels file: CSV (`id,labels` with labels joined by ';') or JSON; see docs/datasets.md."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "labels file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(path, "labels file is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = _parse_csv(path, text)
    elif suffix == ".json":
        table = _parse_json(path, text)
    else:
        raise DataError(path, "unsupported labels file type; use .csv, .json (or cls_labels .npy)")
    if not table.tokens:
        raise DataError(path, "labels file has no rows")
    return table


def _split_labels(cell: str) -> list[Token]:
    return [t.strip() for t in cell.split(";") if t.strip()]


def _parse_csv(path: Path, text: str) -> LabelTable:
    table = LabelTable(path)
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise DataError(path, f"not valid CSV ({e})") from None
    for n, row in enumerate(rows, 1):
        if not row or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if n == 1 and row[0].strip().lower() in _ID_HEADERS:
            continue  # header row
        if len(row) > 2:
            raise DataError(path, f"line {n}: {len(row)} columns; expected 2 (id, labels) with the labels "
                                  "joined by ';', e.g. img_001,cat;dog")
        table.add(row[0], _split_labels(row[1]) if len(row) > 1 else [], f"line {n}")
    return table


def _parse_json(path: Path, text: str) -> LabelTable:
    table = LabelTable(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})") from None

    def tokens(value: Any, where: str) -> list[Token]:
        if isinstance(value, str):
            return _split_labels(value)
        if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            return [v.strip() if isinstance(v, str) else v for v in value]
        raise DataError(path, f"{where}: labels must be a list of class names or indices, got {value!r}")

    if isinstance(data, dict):
        for sid, value in data.items():
            table.add(sid, tokens(value, f"key {sid!r}"), f"key {sid!r}")
    elif isinstance(data, list):
        for n, item in enumerate(data):
            where = f"item {n}"
            if not isinstance(item, dict) or "id" not in item or "labels" not in item:
                raise DataError(path, f"{where}: expected an object with 'id' and 'labels', got {item!r}"[:300])
            table.add(item["id"], tokens(item["labels"], where), where)
    else:
        raise DataError(path, "expected a JSON object {id: [labels]} or a list of {id, labels} objects")
    return table


def write_label_csv(path: str | Path, labels: Mapping[str, np.ndarray], class_names: list[str]) -> None:
    """Atomically write {id: (K,) multi-hot} as a labels CSV with class names (`id,labels`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "labels"])
    for sid, vec in labels.items():
        w.writerow([sid, ";".join(class_names[k + 1] for k in np.flatnonzero(np.asarray(vec) > 0))])
    atomic.write_text(path, buf.getvalue())
