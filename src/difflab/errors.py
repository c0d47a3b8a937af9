"""Errors the command-line entry points show as one line: what the user asked for (a config value, an argument, a
path; exit status 2) and why a run stopped (exit status 1). Imports nothing of difflab, so every layer may raise
them."""

from __future__ import annotations


class UsageError(ValueError):
    """A refusal of the user's input whose message names the value and how to fix it. A ``ValueError``, so
    callers of the Python API that catch ``ValueError`` are unaffected."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist (both a ``UsageError`` and a ``FileNotFoundError``)."""


class RunStopped(RuntimeError):
    """A run stopped for a reason its message fully explains (training diverged, the run directory is in use, the
    disk is full, too much of the data is unreadable): the entry points show it as one line with exit status 1, as
    a traceback would add nothing."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message gives the pip command that installs it."""
