"""A digest of what a data config reads: the config and, for every local file or folder it names, the files there
(relative path, size, modification time). A cache keyed on it goes stale when an image is added, removed or
replaced, which a key on the folder's name would not notice."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# how files are read (workers, what to do with a bad one), not which files or what they become
LOADER_ONLY = frozenset({"num_workers", "on_error", "max_skip_fraction", "pin_memory", "persistent_workers"})


def data_fingerprint(data: Mapping[str, Any]) -> str:
    """The sha256 of a resolved data config (plain containers) and of the listing of every local path in it."""
    config = {key: value for key, value in data.items() if key not in LOADER_ONLY}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in sorted(set(_local_paths(config))):
        digest.update(f"\0{path}\0".encode())
        for entry in _listing(path):
            digest.update(entry.encode())
    return digest.hexdigest()


def _local_paths(node: Any) -> Iterator[str]:
    """Every string in the config that names an existing file or folder here, brace patterns expanded."""
    if isinstance(node, Mapping):
        for value in node.values():
            yield from _local_paths(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _local_paths(value)
    elif isinstance(node, str) and node:
        for candidate in _expand_braces(node):
            path = Path(candidate).expanduser()
            if path.exists():
                yield str(path.resolve())


def _expand_braces(pattern: str) -> list[str]:
    """webdataset's brace patterns ("shard-{000000..000009}.tar"); plain strings as they are."""
    if not re.search(r"\{[^{}]*\.\.[^{}]*\}|\{[^{}]*,[^{}]*\}", pattern):
        return [pattern]
    try:
        from braceexpand import braceexpand
    except ImportError:  # no webdataset extra: no shards to read either
        return [pattern]
    return list(braceexpand(pattern))


def _listing(path: str) -> Iterator[str]:
    """"relative path, size, mtime" per file under a folder (sorted), or of the file itself."""
    if os.path.isfile(path):
        stat = os.stat(path)
        yield f"{stat.st_size} {stat.st_mtime_ns}\n"
        return
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            try:
                stat = os.stat(full)
            except OSError:  # a dangling link or a file removed while walking: part of the listing as such
                yield f"{os.path.relpath(full, path)} missing\n"
                continue
            yield f"{os.path.relpath(full, path)} {stat.st_size} {stat.st_mtime_ns}\n"
