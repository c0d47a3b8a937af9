"""What every rank of a data-parallel run does together: stop at once when one rank fails, and share out and gather
back the items of a job split across ranks (samples by seed, images to featurise).

Without ``fail_together``, a rank that raises alone (a checkpoint write on rank zero, the run lock, the data's skip
limit) exits while the others wait at their next collective until its timeout (30 minutes by default).
torch.distributed only, so that every layer may use it; one process: every function is the identity.
"""

from __future__ import annotations

import torch

from difflab.errors import RunStopped, UsageError


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def share(n: int, world: int | None = None, me: int | None = None) -> range:
    """This rank's items of 0..n-1 (or rank ``me``'s of ``world``): a contiguous block, the blocks' sizes within one
    of each other (none empty when n >= world), so item k is made from the same seed and condition whatever the
    number of ranks."""
    world = world_size() if world is None else world
    me = rank() if me is None else me
    return range(me * n // world, (me + 1) * n // world)


def check_enough(n: int) -> None:
    """Refuse a job of fewer items than processes (a process with no share would have nothing to gather)."""
    if n < world_size():
        raise UsageError(f"n={n} samples on {world_size()} processes: give n at least the number of devices")


def gather(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a tensor, concatenated in rank order, on every rank and on the CPU: with ``share``,
    the whole job's rows in item order. All ranks pass one dtype and trailing shape; any number of rows each."""
    world = world_size()
    if world == 1:
        return local.cpu()
    import torch.distributed as dist

    device = _collective_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    sizes = [int(size) for size in sizes]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)  # all_gather: equal shapes
    padded[: len(local)] = local.to(device)
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    return torch.cat([block[:size] for block, size in zip(blocks, sizes, strict=True)]).cpu()


def _collective_device() -> torch.device:
    """Where the process group reduces: this rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
