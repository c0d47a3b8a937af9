"""Unreadable files in the training data (``data.on_error``): ``raise`` stops at the first one, naming it; ``skip``
replaces it in its batch, reports each once in the main process and stops once more than ``data.max_skip_fraction``
of the data is unreadable. DataLoader workers are separate processes, so the skipped paths travel with the batch
(``batch["skipped"]``) and the datamodule's ``on_before_batch_transfer`` counts them; under DDP a rank over the
limit stops every rank."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch.utils.data import Subset, default_collate

from difflab.all_ranks import fail_together
from difflab.data.images import UnreadableImageError
from difflab.errors import RunStopped, UsageError

ON_ERROR = ("raise", "skip")
SKIPPED_KEY = "skipped"  # an item's / a batch's list of the files skipped in its place
METRIC = "data/skipped"


def check_on_error(on_error: str, max_skip_fraction: float) -> None:
    if on_error not in ON_ERROR:
        raise UsageError(f"data.on_error={on_error!r}: expected one of {', '.join(ON_ERROR)}")
    if not 0 <= max_skip_fraction <= 1:
        raise UsageError(f"data.max_skip_fraction={max_skip_fraction}: expected a fraction in [0, 1]")


def fix_hint(source: str) -> str:
    return f"list them with python -m difflab.data.check {source} and remove them, or raise data.max_skip_fraction"


class SkipUnreadable(Subset):
    """A split of a dataset whose items' images may be unreadable (``UnreadableImageError`` with a ``path``): such
    an item is replaced by the next readable one of the same split (so a batch keeps its size and no validation
    image leaks into training), and the item returned lists the skipped paths in ``item["skipped"]``."""

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for offset in range(len(self.indices)):
            try:
                item = self.dataset[self.indices[(index + offset) % len(self.indices)]]
            except UnreadableImageError as err:
                skipped.append(str(err.path))
                continue
            return {**item, SKIPPED_KEY: skipped}
        raise UnreadableImageError(f"no readable image among the {len(self.indices)} of this split "
                                   f"(e.g. {skipped[0]})", path=skipped[0])

    def __getitems__(self, indices: list[int]) -> list[dict]:  # Subset's batched fetch would bypass __getitem__
        return [self[i] for i in indices]


def collate_skipped(items: list[dict]) -> dict:
    """``default_collate`` of dict items, their ``skipped`` lists joined into the batch's (they differ in length)."""
    skipped = [path for item in items for path in item.pop(SKIPPED_KEY, ())]
    batch = default_collate(items)
    batch[SKIPPED_KEY] = skipped
    return batch


class SkippedFiles:
    """The unreadable files met so far in this process, each reported once. With ``total`` (a folder's number of
    files) the share is unique unreadable files / total; without (a resampled shard stream) it is the share of the
    reads that failed, over at least ``min_reads`` reads, so that a bad first batch does not stop a run."""

    def __init__(self, max_fraction: float, source: str, total: int | None = None, min_reads: int = 1):
        self.max_fraction = max_fraction  # data.max_skip_fraction
        self.source = source  # the folder or shards, for messages
        self.total, self.min_reads = total, min_reads
        self.paths: dict[str, None] = {}  # insertion-ordered set
        self.failed_reads = self.reads = 0  # with repeats (a stream reads a file again)

    def fraction(self) -> float:
        if self.total:
            return len(self.paths) / self.total
        return self.failed_reads / max(self.reads, self.min_reads, 1)

    def update(self, skipped: Sequence[str], batch_size: int) -> list[str]:
        """Count a batch of ``batch_size`` items read in place of the ``skipped`` files: warn about the files new
        here and return them; raise once more than ``max_fraction`` of the data is unreadable."""
        self.failed_reads += len(skipped)
        self.reads += batch_size + len(skipped)
        new = [path for path in dict.fromkeys(skipped) if path not in self.paths]
        for path in new:
            self.paths[path] = None
            warnings.warn(f"skipped unreadable file {path} ({len(self.paths)} so far; data.on_error=skip)",
                          stacklevel=2)
        if self.fraction() > self.max_fraction:
            of = f"of {self.total} files " if self.total else f"(of {self.reads} reads) "
            raise RunStopped(f"{len(self.paths)} unreadable files {of}({self.fraction():.2%}) in {self.source}, more "
                               f"than data.max_skip_fraction={self.max_fraction} (e.g. {next(iter(self.paths))}): "
                               f"{fix_hint(self.source)}")
        return new

    def state_dict(self) -> dict:
        return {"paths": list(self.paths), "failed_reads": self.failed_reads, "reads": self.reads}

    def load_state_dict(self, state: dict) -> None:
        self.paths = dict.fromkeys(state.get("paths", ()))
        self.failed_reads, self.reads = state.get("failed_reads", 0), state.get("reads", 0)


class CountsSkippedFiles:
    """For LightningDataModules with ``self.skipped`` (a ``SkippedFiles``, or None for ``on_error=raise``): counts
    the batches' skipped files in the main process, logs their number as ``data/skipped`` to the trainer's loggers
    when it grows (``self.log`` is not allowed in batch-transfer hooks) and keeps it in checkpoints (resuming keeps
    counting)."""

    skipped: SkippedFiles | None = None

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.skipped is None or not isinstance(batch, dict):
            return batch
        trainer = getattr(self, "trainer", None)
        error, new, skipped = None, [], batch.pop(SKIPPED_KEY, None)
        try:
            if skipped is not None:
                new = self.skipped.update(skipped, len(batch["image"]))
        except RunStopped as err:
            error = err
        # under DDP each rank counts its own files: a rank over the limit stops every rank, now
        fail_together(error, trainer.strategy.root_device if trainer is not None else "cpu")
        if new:
            for logger in trainer.loggers if trainer is not None else ():
                logger.log_metrics({METRIC: len(self.skipped.paths)}, step=trainer.global_step)
        return batch

    def state_dict(self) -> dict:
        return {"skipped_files": self.skipped.state_dict()} if self.skipped is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.skipped is not None and "skipped_files" in state_dict:
            self.skipped.load_state_dict(state_dict["skipped_files"])
