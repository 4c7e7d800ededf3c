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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        # A DataError raised inside a DataLoader worker arrives wrapped with the worker's traceback.
        if "Original Traceback" in msg and "wsss.errors." in msg:
            last = [line for line in msg.strip().splitlines() if line.strip()][-1]
            print(f"error: {last.split(': ', 1)[-1]}", file=sys.stderr)
            sys.exit(2)
        raise
