"""``checkpoints/last.ckpt`` wherever training stops: at its end, or on a preemption signal."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info


class LastCheckpoint(L.Callback):
    """Writes ``checkpoints/last.ckpt`` when training ends (``ModelCheckpoint`` saves every N steps only, so a run
    stopped by ``max_time`` would otherwise lose its last steps), and on SIGUSR1 / SIGTERM (a scheduler's notice
    before it kills the job): finish the current step, write
    ``checkpoints/last.ckpt`` and stop cleanly; ``python train.py ... ckpt_path=auto`` in the same run directory
    then resumes from it (step, optimizer, EMA, and the W&B run, whose id is kept in the run directory).

    Under SLURM with Lightning's auto-requeue, SIGUSR1 belongs to Lightning's ``SLURMEnvironment`` (it saves an
    ``hpc_ckpt`` and requeues the job): this callback then leaves SIGUSR1 alone, so that only one party requeues.
    Under submitit (Hydra's submitit launchers; ``SUBMITIT_EXECUTOR`` is set) requeue belongs to submitit, which
    listens to ``SUBMITIT_PREEMPT_SIGNAL`` (USR2 by default): this callback listens to it too, writes
    ``last.ckpt`` when training has stopped, then calls submitit's handler, which resubmits the job and exits.
    Under DDP a signal that reaches one rank stops all of them at the same step (an any-rank reduction).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")):
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._saved_step = -1
        self._stopped = False

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    @property
    def interrupted(self) -> bool:
        """Whether training stopped on a signal, to this rank or another (not at its end)."""
        return self.received is not None or self._stopped

    def listened_signals(self) -> list[str]:
        names = list(self.signals)
        if os.environ.get("SUBMITIT_EXECUTOR"):  # submitit's preemption / time-out notice
            name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
            names += [name] if name not in names else []
        return names

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the environment Lightning's signal connector consults (single-device strategies carry none themselves)
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None) or \
            getattr(trainer.strategy, "cluster_environment", None)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and getattr(environment, "auto_requeue", False)
        for name in self.listened_signals():
            if name == "SIGUSR1" and slurm_requeue:
                continue
            signum = getattr(signal, name, None)
            if signum is None:  # e.g. SIGUSR1 on Windows
                continue
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: signals cannot be caught here
                return

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(torch.tensor(stop), all=False)
        if not stop:
            return
        self._stopped = True
        path = self.save(trainer)
        rank_zero_info(f"{self.received or 'a signal on another rank'}: saved {path} at step {trainer.global_step}; "
                       "restart with ckpt_path=auto in the same run directory to continue")
        trainer.should_stop = True

    def save(self, trainer: L.Trainer) -> Path:
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # every rank calls it; rank 0 writes
        self._saved_step = trainer.global_step
        return path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        saved = max(self._saved_step, getattr(callback, "_last_global_step_saved", -1) if callback else -1)
        if trainer.global_step != saved and trainer.global_step > 0:
            self.save(trainer)

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else \
            Path(trainer.default_root_dir) / "checkpoints"
        return folder / "last.ckpt"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():  # put back the handlers training displaced
            signal.signal(signum, previous)
        self._previous.clear()

    def pass_on_signal(self) -> None:
        """Once training has stopped and ``last.ckpt`` is written (``trainer.fit`` returned), hand the signal that
        stopped it to the handler it displaced, if that is a Python function: submitit's, which resubmits the job
        and exits. The default actions (terminate) are not replayed: the process ends on its own."""
        if self.received is None:
            return
        signum = signal.Signals[self.received]
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)
