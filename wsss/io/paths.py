"""Path containment: names from list files and label files must stay inside their root."""

from __future__ import annotations

import re
from pathlib import Path

from wsss.errors import DataError

# Letters (any script), digits and a few punctuation marks common in photo names ("IMG (2).jpg");
# no backslash, colon or control characters, so an id is also a safe relative file name everywhere.
_SAFE_ID = re.compile(r"^[\w.\-()+,@][\w.\-()+,@ /]*$")


def safe_join(root: str | Path, relative: str, source: str | Path | None = None) -> Path:
    """Join `relative` under `root`, rejecting absolute paths, `..` and symlinks that leave the root.

    `source` names the file the relative path came from (a split list, a labels file) for the error.
    """
    where = f" (listed in {source})" if source else ""
    rel = str(relative)
    if not rel or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise DataError(source, f"path {rel!r}{where} is absolute or empty; entries must be relative to {root}")
    parts = Path(rel).parts
    if any(p == ".." for p in parts):
        raise DataError(source, f"path {rel!r}{where} contains '..'; entries must stay inside {root}")
    root_resolved = Path(root).resolve()
    joined = Path(root) / rel
    resolved = joined.resolve()
    if not resolved.is_relative_to(root_resolved):
        raise DataError(source, f"path {rel!r}{where} resolves to {resolved}, outside {root_resolved} (symlink out of the root?)")
    return joined


def check_sample_id(sample_id: str, source: str | Path | None = None) -> str:
    """Validate a sample id read from a list file: a plain relative name, no traversal."""
    sid = sample_id.strip()
    if not sid:
        raise DataError(source, "empty sample id")
    parts = sid.split("/")
    if not _SAFE_ID.match(sid) or any(p in ("", ".", "..") for p in parts):
        raise DataError(source, f"sample id {sid!r} is not a plain relative name (letters, digits, spaces and "
                                "_ . - ( ) + , @ separated by '/'; no '..', no absolute paths)")
    return sid


def check_within(path: str | Path, root: str | Path, what: str = "output") -> Path:
    """Ensure `path` (after resolving symlinks) lies inside `root`; return it."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if not p.is_relative_to(r):
        raise DataError(path, f"{what} path resolves outside {r}")
    return Path(path)
