"""n items of a dataset, indexable or a stream of shards: what FID statistics, evaluation and probes read."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, IterableDataset

from difflab.errors import UsageError


def is_stream(dataset: Dataset) -> bool:
    """A dataset without length or indexing (``data=webdataset``'s shards)."""
    return isinstance(dataset, IterableDataset)


def size(dataset: Dataset) -> int | None:
    """The number of items; None for a stream."""
    return None if is_stream(dataset) else len(dataset)


def draw(dataset: Dataset, n: int, seed: int = 0) -> list[dict]:
    """Up to n items: an indexable dataset's at a seeded random order, a stream's first n in shard order (read
    here, not split across ranks: the same items on every rank)."""
    if is_stream(dataset):
        return _head(dataset, n)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return [dataset[int(i)] for i in order]


def first(dataset: Dataset, n: int) -> list[dict]:
    """The first n items (fewer if there are fewer)."""
    if is_stream(dataset):
        return _head(dataset, n)
    return [dataset[i] for i in range(min(n, len(dataset)))]


def _head(dataset: IterableDataset, n: int) -> list[dict]:
    head = getattr(dataset, "head", None)
    if head is None:
        raise UsageError(f"{type(dataset).__name__} is a stream without head(n): its first items cannot be read "
                         "for statistics")
    return head(n)
