"""User-facing errors: the CLI prints their message, never a traceback (`run_guarded`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable


class WsssError(Exception):
    """Base class for errors caused by the user's input, config or environment."""


class ConfigError(WsssError):
    """A recipe or override is invalid (unknown key, wrong type, bad value, missing file)."""


class DataError(WsssError):
    """A data file is missing, unreadable or inconsistent; the message names the file."""

    def __init__(self, path: str | Path | None, problem: str | None = None):
        if problem is None:  # re-raised from a DataLoader worker with only the message
            path, problem = None, str(path)
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CheckpointError(WsssError):
    """A checkpoint does not match the model it is loaded into, or is unsafe."""


class RunDirError(WsssError):
    """The run directory cannot be written (permissions, full disk) or is inconsistent."""


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`; user errors print one clear line (no traceback), Ctrl-C says how to resume."""
    try:
        return fn()
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; rerun the same command to resume where it stopped", file=sys.stderr)
        sys.exit(130)
    except WsssError as e:
        print(f"error: {one_line_worker_error(e) or e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        line = one_line_worker_error(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


def one_line_worker_error(exc: BaseException) -> str | None:
    """The message of a wsss error raised in a DataLoader worker, without the worker's traceback; else None.

    The DataLoader re-raises a worker's exception in the main process as the same type (a DataError
    stays a DataError) whose message is "Caught X in DataLoader worker process N. Original Traceback
    ...", ending with the line "wsss.errors.X: <our message>".
    """
    msg = str(exc)
    if "Original Traceback" not in msg:
        return None
    last = next((line for line in reversed(msg.splitlines()) if line.strip()), "")
    if not last.startswith("wsss.errors."):
        return None
    return last.split(": ", 1)[1] if ": " in last else None
