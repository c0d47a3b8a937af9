"""Writing files atomically: a reader (a viewer, another rank, the next run) never sees a half-written file, and
an interrupted write (a kill, a full disk) leaves the previous file in place."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path, keep_suffix: bool = True) -> Path:
    """The hidden, per-process temporary file beside ``path``: ``.name.tmp-PID.ext`` (the extension kept for
    writers that infer the format from it) or ``.name.ext.tmp-PID`` (invisible to a glob for ``*.ext``)."""
    if keep_suffix:
        return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_write(path: str | os.PathLike, keep_suffix: bool = True, sync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (parent folders created) to write to; when the block succeeds it is
    renamed over ``path``, otherwise removed. ``sync``: flush it to disk first, so that a power loss cannot leave a
    renamed but empty file (worth it for checkpoints, not for every PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, keep_suffix)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left in ``folder`` (not this process's); returns
    them. Call it once the folder is known to have no other live writer (the run-directory lock is held)."""
    mine = f".tmp-{os.getpid()}"
    left = [p for p in Path(folder).glob(".*.tmp-*") if mine not in p.name] if Path(folder).is_dir() else []
    for p in left:
        p.unlink(missing_ok=True)
    return left
