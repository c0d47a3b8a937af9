"""What every difflab LightningModule shares: the optimizer factories, per-rank seeds and the run config that
checkpoints carry (so ``difflab.load`` / sample.py can rebuild the model without the original config files)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch

from difflab.lightning.distributed import seed_this_rank
from difflab.lightning.optimization import optimizers_from_factories
from difflab.loading import store_run_config


class DifflabModule(L.LightningModule):
    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer],  # partial: optimizer(params)
                 lr_scheduler: Callable[..., Any] | None = None,  # partial: lr_scheduler(optimizer), per step
                 run_config: dict | None = None):  # the composed run config, stored in checkpoints
        super().__init__()
        self.optimizer_factory, self.lr_scheduler_factory, self.run_config = optimizer, lr_scheduler, run_config

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """What the optimizer updates (the network, not an EMA copy or a frozen first stage)."""
        return self.parameters()

    def configure_optimizers(self):
        return optimizers_from_factories(self.trainable_parameters(), self.optimizer_factory,
                                         self.lr_scheduler_factory)

    def on_fit_start(self) -> None:
        seed_this_rank(self.trainer)  # under DDP every rank draws its own noise, timesteps and condition drops

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        store_run_config(checkpoint, self.run_config)
