"""Decisions every rank of a data-parallel run takes together: an error on one rank stops all of them at once.

Without this, a rank that raises alone (a checkpoint write on rank zero, the run lock, the data's skip limit)
exits while the others wait at their next collective until its timeout (30 minutes by default). torch.distributed
only, so that every layer may use it.
"""

from __future__ import annotations

import torch

from difflab.errors import RunStopped


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def fail_together(error: BaseException | None, device: torch.device | str = "cpu") -> None:
    """Called by every rank at the same point, with its own error or None: if any rank has one, every rank raises,
    with the message of the lowest failing rank (a rank with an error raises its own). ``device`` is where the
    process group's backend reduces (the rank's GPU under NCCL)."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    failed = torch.tensor([int(error is not None)], device=device)
    dist.all_reduce(failed)
    if not int(failed.item()):
        return
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else str(error))  # strings from our own ranks
    if error is not None:
        raise error
    rank, message = next((rank, message) for rank, message in enumerate(reports) if message is not None)
    raise RankFailed(message, rank=rank)


class RankFailed(RunStopped):
    """Another rank stopped the run; the message is that rank's."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank
