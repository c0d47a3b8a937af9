"""A callback that records, on every rank, what a data-parallel training did: the dataset indices of each step,
the timesteps each step drew, the network after each optimizer step, the final network and EMA. Used by
test_ddp.py through ``+callbacks.probe._target_=ddp_probe.Probe`` (tests/ on PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.nn.utils import parameters_to_vector


class RecordingLoss:
    def __init__(self, loss, timesteps: list):
        self.inner, self.timesteps = loss, timesteps

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.timesteps.append(out.t.detach().cpu())
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Probe(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.record = {"indices": [], "timesteps": [], "params": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["initial_params"] = parameters_to_vector(pl_module.network.parameters()).detach().clone()
        self.record["initial_ema"] = parameters_to_vector(pl_module.ema.parameters()).detach().clone()
        pl_module.loss = RecordingLoss(pl_module.loss, self.record["timesteps"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["indices"].append(batch["index"].cpu())

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.record["params"].append(parameters_to_vector(pl_module.network.parameters()).detach().clone())

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.loss = pl_module.loss.inner
        self.record.update(
            rank=trainer.global_rank, world_size=trainer.world_size, global_step=trainer.global_step,
            ema_updates=int(pl_module.ema_updates), ema_decay=pl_module.ema_decay,
            final_params=parameters_to_vector(pl_module.network.parameters()).detach().clone(),
            final_ema=parameters_to_vector(pl_module.ema.parameters()).detach().clone(),
            lr=trainer.optimizers[0].param_groups[0]["lr"],
            names=[name for name, _ in pl_module.network.named_parameters()])
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")
