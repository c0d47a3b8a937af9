"""Lightning's DDP, where a checkpoint write that fails on rank zero fails every rank at once with its message."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.strategies import StrategyRegistry

from difflab.all_ranks import fail_together


class DDPStrategy(LightningDDPStrategy):
    """``trainer.strategy=ddp`` (and Lightning's other DDP names) build this. Lightning's rank zero writes the
    checkpoint and then joins a barrier: when the write raises (a full disk, a non-finite checkpoint refused),
    rank zero exits and the other ranks wait at that barrier until the collective timeout. Here every rank learns
    the outcome of the write (``all_ranks.fail_together``) and raises the same error."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        error = None
        if self.is_global_zero:
            try:
                self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            except Exception as err:  # every failure of the write, whatever torch raised
                error = err
        fail_together(error, self.root_device)


def strategy_from_name(strategy):
    """A Lightning strategy name registered for its plain ``DDPStrategy`` ("ddp", "ddp_spawn",
    "ddp_find_unused_parameters_true", ...) as difflab's ``DDPStrategy`` with the same arguments; anything else as
    given."""
    if isinstance(strategy, str) and strategy in StrategyRegistry and \
            StrategyRegistry[strategy]["strategy"] is LightningDDPStrategy:
        return DDPStrategy(**StrategyRegistry[strategy]["init_params"])
    return strategy
