"""Exceptions raised at the engine's boundaries.

Every error a user can cause (a bad file, a wrong argument, a missing model) is an
``M4oEError``. Its message is one line that names the file or value and the problem, so the
command line can print it as is and exit with a non-zero code.
"""

from __future__ import annotations

from pathlib import Path


class M4oEError(Exception):
    """A user-facing error: one line naming the file or value and what is wrong with it."""

    exit_code = 1

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class InputError(M4oEError, ValueError):
    """An input image or argument that the engine refuses (exit code 2)."""

    exit_code = 2


class OutputError(M4oEError):
    """An output that cannot be written: it exists already, or the folder is not writable (exit code 3)."""

    exit_code = 3


class ModelError(M4oEError, ValueError):
    """A model that cannot be found, verified or loaded (exit code 4)."""

    exit_code = 4


class CancelledError(M4oEError):
    """The caller's cancel check asked the job to stop (exit code 130, as for Ctrl-C)."""

    exit_code = 130
