"""``ema=posthoc``: EDM2's power-function EMA profiles of the network, snapshotted every ``snapshot_every`` steps
into ``<run dir>/posthoc_ema`` so that any EMA length can be reconstructed after training (difflab.ema)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from difflab.ema.power import beta, gamma_of
from difflab.ema.snapshots import write_snapshot
from difflab.errors import UsageError


class PostHocEMA(L.Callback):
    """One float32 average of the network's parameters per ``sigma_rels`` entry, updated after every optimizer step
    the module's own EMA takes (so skipped non-finite steps are skipped here too) with beta = (1 - 1/t)^(gamma + 1),
    t the number of steps so far. Kept on rank zero only (the ranks' parameters are equal); saved in checkpoints,
    so a resumed run continues the same profiles. The module's EMA (``model.ema_decay``) is kept as it is."""

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every: int = 1000,
                 dirpath: str | None = None):
        if snapshot_every < 1:
            raise UsageError(f"ema.snapshot_every must be at least 1, got {snapshot_every}")
        try:
            self.gammas = [gamma_of(float(s)) for s in sigma_rels]
        except ValueError as err:
            raise UsageError(f"ema.sigma_rels: {err}") from err
        self.sigma_rels, self.snapshot_every, self.dirpath = list(sigma_rels), int(snapshot_every), dirpath
        self.profiles: list[dict[str, torch.Tensor]] | None = None
        self.updates = 0  # the module's EMA update count the profiles include
        self._module = None
        self._folder: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "ema_updates"):
            raise UsageError(f"ema=posthoc averages a diffusion model's network; {type(pl_module).__name__} has no EMA")
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(trainer.strategy, ModelParallelStrategy):
            raise UsageError("ema=posthoc with trainer=fsdp is not supported yet: its profiles would hold shards; "
                             "use trainer=ddp")
        self._module = pl_module
        self._folder = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "posthoc_ema"
        self._zero = trainer.is_global_zero

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath)  # several may run, each with its own folder

    def _parameters(self) -> dict[str, torch.Tensor]:
        return dict(self._module.network.named_parameters())

    @torch.no_grad()
    def _catch_up(self) -> None:
        """Fold in the step the module's EMA took since the last call (none if it took none)."""
        if self._module is None or not self._zero:
            return
        updates = int(self._module.ema_updates)
        if updates == self.updates:
            return
        if updates != self.updates + 1:
            raise RuntimeError(f"post-hoc EMA at update {self.updates}, the module's EMA at {updates}: a step was "
                               "missed")
        params = self._parameters()
        if self.profiles is None:
            self.profiles = [{name: p.detach().float().clone() for name, p in params.items()} for _ in self.gammas]
        names = list(params)
        for gamma, profile in zip(self.gammas, self.profiles, strict=True):
            decay = beta(gamma, updates)  # 0 at t = 1: the first step's weights
            averages = [profile[name] for name in names]
            if averages[0].device != params[names[0]].device:
                averages = [a.to(params[name].device) for a, name in zip(averages, names, strict=True)]
                profile.update(zip(names, averages, strict=True))
            torch._foreach_lerp_(averages, [params[name].detach().float() for name in names], 1.0 - decay)
        self.updates = updates
        if updates % self.snapshot_every == 0:
            self._snapshot()

    def _snapshot(self) -> None:
        buffers = {name: b for name, b in self._module.network.named_buffers()}
        write_snapshot(self._folder, self.updates, self.gammas, self.profiles, buffers)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.profiles is None and int(pl_module.ema_updates) > 0:
            raise UsageError(f"ema=posthoc starts with a run: this one resumes at EMA update "
                             f"{int(pl_module.ema_updates)} without post-hoc profiles in its checkpoint")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._catch_up()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._catch_up()
        if self._zero and self.profiles is not None and self.updates % self.snapshot_every:
            self._snapshot()  # the last step, whatever the interval

    def state_dict(self) -> dict:
        self._catch_up()  # a checkpoint written by another callback in this step's end holds this step too
        profiles = {f"profile{k}.{name}": value.cpu() for k, profile in enumerate(self.profiles or [])
                    for name, value in profile.items()}
        return {"updates": self.updates, "sigma_rels": list(self.sigma_rels), "profiles": profiles}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state.get("sigma_rels", [])] != [float(s) for s in self.sigma_rels]:
            raise UsageError(f"the checkpoint tracked sigma_rels {state.get('sigma_rels')}, this run "
                             f"{self.sigma_rels}: resume with the same ema.sigma_rels")
        self.updates = int(state["updates"])
        profiles = state["profiles"]
        self.profiles = None if not profiles else [
            {key.split(".", 1)[1]: value for key, value in profiles.items() if key.startswith(f"profile{k}.")}
            for k in range(len(self.sigma_rels))]
