"""Checkpoint files that are always whole and always finite: written to a temporary file and renamed, refused when
they hold non-finite weights, and held back while training is skipping non-finite steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from difflab.errors import RunStopped
from difflab.files import atomic_write
from difflab.loading import one_line


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (a full disk, a lost mount); the file it would have replaced is intact.
    ``errno`` is the failed write's."""


class NonFiniteCheckpointError(RunStopped):
    """A checkpoint held NaN or inf weights and was not written."""


def non_finite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold a NaN or an inf."""
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, made safe for long runs (every ``trainer.save_checkpoint`` and every
    ModelCheckpoint save and removal goes through it):

    - a local checkpoint is written to ``.<name>.tmp-<pid>`` beside it, flushed to disk and renamed over it, so a
      kill or a full disk mid-write leaves the previous file whole (fsspec URLs go through Lightning's own writer);
    - a failed write raises ``CheckpointWriteError`` saying what was not written and that the previous file stands;
    - a state dict with a non-finite floating-point tensor is refused (``NonFiniteCheckpointError``);
    - while ``hold`` is set (the non-finite guard's reason: the weights reproduce a NaN loss), saves and removals are
      skipped with a warning, so ``last.ckpt`` and the periodic checkpoints keep the last good state.

    ``written`` lists ``(global_step, path)`` of every checkpoint this process wrote, for the guard's message.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hold: str | None = None
        self.written: list[tuple[int, str]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        step = int(checkpoint.get("global_step", -1))
        if self.hold is not None:
            rank_zero_warn(f"not writing {path} at step {step}: {self.hold}")
            return
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(
                f"refusing to write {path} at step {step}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); "
                f"{self.last_written_message(step + 1)}")
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            _write_atomically(checkpoint, Path(path))
        self.written.append((step, str(path)))

    def remove_checkpoint(self, path) -> None:
        if self.hold is not None:  # a top-k rotation must not delete a good file for one that was not written
            return
        super().remove_checkpoint(path)

    def last_written(self, before_step: int) -> tuple[int, str] | None:
        """The newest ``(step, path)`` written by this process before ``before_step`` whose file still exists."""
        earlier = [(step, path) for step, path in self.written if step < before_step and os.path.exists(path)]
        # the newest step; at equal steps prefer the file named by step, which no later save overwrites
        return max(earlier, key=lambda item: (item[0], Path(item[1]).name != "last.ckpt"), default=None)

    def last_written_message(self, before_step: int, resumed_from: str | None = None) -> str:
        last = self.last_written(before_step)
        if last is not None:
            return f"the last good checkpoint is {last[1]} (step {last[0]}): resume with ckpt_path={last[1]}"
        if resumed_from:
            return f"the last good checkpoint is the one this run resumed from: ckpt_path={resumed_from}"
        return "no checkpoint was written before it"


def _is_local(path) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    # Our own writer rather than Lightning's fsspec transaction: the rename is the only change to the target, the
    # data is on disk before it, and a failed write says what was kept.
    # Any exception: torch's zip writer reports a full disk or a file-size limit as a RuntimeError ("unexpected
    # pos ..."), not an OSError.
    try:
        with atomic_write(path, keep_suffix=False, sync=True) as tmp:  # .last.ckpt.tmp-PID: not a *.ckpt
            torch.save(checkpoint, tmp)
    except Exception as err:
        kept = f"the previous {path.name} is intact" if path.exists() else f"there was no previous {path.name}"
        if isinstance(err, OSError):
            why = err.strerror or one_line(err)
        else:
            why = f"{type(err).__name__}: {one_line(err)}; a full disk, a file-size limit or a lost mount"
        error = CheckpointWriteError(f"could not write checkpoint {path} ({why}); {kept}. Free space or fix the "
                                     "folder, then resume with ckpt_path=auto")
        error.errno = getattr(err, "errno", None)
        raise error from err
