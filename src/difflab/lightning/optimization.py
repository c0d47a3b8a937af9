"""The optimizer and LR scheduler of a LightningModule from the config's ``_partial_`` factories."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def optimizers_from_factories(params: Iterable[torch.nn.Parameter], optimizer: Callable[..., torch.optim.Optimizer],
                              lr_scheduler: Callable[..., Any] | None = None):
    """``configure_optimizers``' return value: ``optimizer(params)``, and ``lr_scheduler(optimizer)`` stepped
    every optimizer step (the configs count in steps, not epochs)."""
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}
