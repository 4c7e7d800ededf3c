"""User-facing errors: the CLI prints their message, never a traceback."""

from __future__ import annotations

from pathlib import Path


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
