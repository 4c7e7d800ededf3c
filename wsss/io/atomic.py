"""Atomic file writes: write to a temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from wsss.errors import RunDirError

TMP_PREFIX = ".tmp-"


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_mode()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _as_run_dir_error(path, e) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp creates 0600; outputs should be as readable as any file
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _as_run_dir_error(path, e) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write `data` to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 `text` to `path`."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_with(path: str | Path, writer: Callable[[io.BufferedWriter], None]) -> None:
    """Atomically write a file produced by `writer(file_object)` (np.savez, PIL.save, ...)."""
    buf = io.BytesIO()
    writer(buf)
    write_bytes(path, buf.getvalue())


def finished_files(directory: str | Path, pattern: str) -> list[Path]:
    """Sorted files of `directory` matching `pattern`, without temporaries of writes in progress (`*` matches them)."""
    return sorted(p for p in Path(directory).glob(pattern) if not p.name.startswith(TMP_PREFIX))


def clean_temporaries(directory: str | Path) -> int:
    """Delete temporaries left by a killed writer in `directory` (recursively); return how many."""
    n = 0
    for p in Path(directory).rglob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _as_run_dir_error(path: Path, e: OSError) -> RunDirError:
    if e.errno == errno.ENOSPC:
        return RunDirError(f"{path}: no space left on device; free some space and rerun the same command to resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunDirError(f"{path}: cannot write ({e.strerror}); make its folder writable or write elsewhere "
                           "(run.root=... for a run, --output for predict and crf)")
    return RunDirError(f"{path}: write failed ({e.strerror or e})")
