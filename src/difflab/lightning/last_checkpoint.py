"""``checkpoints/last.ckpt`` wherever training stops: at its end, or on a preemption signal."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from difflab.lightning.compat import cluster_environment, last_saved_step


class LastCheckpoint(L.Callback):
    """Writes ``checkpoints/last.ckpt`` when training ends (``ModelCheckpoint`` saves every N steps only, so a run
    stopped by ``max_time`` would otherwise lose its last steps), and on SIGUSR1 / SIGTERM (a scheduler's notice
    before it kills the job): finish the current step, write
    ``checkpoints/last.ckpt`` and stop cleanly; ``python train.py ... ckpt_path=auto`` in the same run directory
    then resumes from it (step, optimizer, EMA, and the W&B run, whose id is kept in the run directory).

    Under SLURM (``#SBATCH --signal=SIGUSR1@90 --requeue``), SIGUSR1 is the time-limit notice: after writing
    ``last.ckpt`` rank zero requeues the job (``scontrol requeue``; ``difflab.lightning.slurm``), and the requeued
    job resumes at the signalled step. Lightning's own auto-requeue is off (``slurm.cluster_plugins``); were it
    on, this callback would leave SIGUSR1 to it, so that only one party requeues.
    Under submitit (Hydra's submitit launchers; ``SUBMITIT_EXECUTOR`` is set) requeue belongs to submitit, which
    listens to ``SUBMITIT_PREEMPT_SIGNAL`` (USR2 by default): this callback listens to it too, writes
    ``last.ckpt`` when training has stopped, then calls submitit's handler, which resubmits the job and exits. If
    the step does not end within ``handoff_timeout_s`` (a long validation or FID evaluation), submitit's handler
    is called at once: the job is resubmitted from the last periodic checkpoint rather than killed unrequeued.
    Under DDP a signal that reaches one rank stops all of them at the same step (an any-rank reduction).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), handoff_timeout_s: float = 60.0,
                 slurm_requeue: bool = True):
        self.signals = tuple(signals)
        self.slurm_requeue = slurm_requeue
        self._requeue_here = False  # under SLURM, on global rank zero: SIGUSR1 requeues the job after the save
        self.handoff_timeout_s = handoff_timeout_s
        self.received: str | None = None
        self._original: dict[int, object] = {}  # the handlers before Lightning's and ours
        self._installed: list[int] = []
        self._saved_step = -1
        self._stopped = False
        self._handed_off = False
        self._alarm_previous = None

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if signum == self._submitit_signal() and self.handoff_timeout_s and hasattr(signal, "setitimer"):
            self._alarm_previous = signal.signal(signal.SIGALRM, self._deadline)
            signal.setitimer(signal.ITIMER_REAL, self.handoff_timeout_s)

    def _deadline(self, signum, frame) -> None:
        """The step did not end in time: let submitit requeue now, from the last periodic checkpoint."""
        self._hand_off()

    @staticmethod
    def _submitit_signal() -> int | None:
        if not os.environ.get("SUBMITIT_EXECUTOR"):
            return None
        name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
        return getattr(signal, name, None)

    @property
    def interrupted(self) -> bool:
        """Whether training stopped on a signal, to this rank or another (not at its end)."""
        return self.received is not None or self._stopped

    def listened_signals(self) -> list[str]:
        names = list(self.signals)
        submitit = self._submitit_signal()  # submitit's preemption / time-out notice
        if submitit is not None and signal.Signals(submitit).name not in names:
            names.append(signal.Signals(submitit).name)
        return names

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Lightning installs its own handlers (it puts these back when fit ends, before our teardown)
        self._original = {getattr(signal, name): signal.getsignal(getattr(signal, name))
                          for name in self.listened_signals() if hasattr(signal, name)}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        environment = cluster_environment(trainer)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and getattr(environment, "auto_requeue", False)
        self._requeue_here = (self.slurm_requeue and isinstance(environment, SLURMEnvironment) and not slurm_requeue
                              and self._submitit_signal() is None and trainer.is_global_zero)
        for name in self.listened_signals():
            if name == "SIGUSR1" and slurm_requeue:
                continue
            signum = getattr(signal, name, None)
            if signum is None:  # e.g. SIGUSR1 on Windows
                continue
            try:
                signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: signals cannot be caught here
                return
            self._installed.append(signum)

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
        saved = max(self._saved_step, last_saved_step(callback))
        if trainer.global_step != saved and trainer.global_step > 0:
            self.save(trainer)

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else \
            Path(trainer.default_root_dir) / "checkpoints"
        return folder / "last.ckpt"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum in self._installed:  # where ours is still in place, put back what was there before fit
            if signal.getsignal(signum) == self._handler and signum in self._original:
                signal.signal(signum, self._original[signum])
        self._installed.clear()

    def pass_on_signal(self) -> None:
        """Once training has stopped and ``last.ckpt`` is written (``trainer.fit`` returned), hand submitit's
        preemption signal to submitit's handler, which resubmits the job and exits; under SLURM, requeue the job on
        SIGUSR1 (rank zero). Other signals are not passed on: training stopped cleanly and the process ends."""
        if self.received is not None and signal.Signals[self.received] == self._submitit_signal():
            self._hand_off()
        elif self.received == "SIGUSR1" and self._requeue_here:
            from difflab.lightning import slurm

            slurm.requeue()

    def _hand_off(self) -> None:
        if self._handed_off:
            return
        self._handed_off = True
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            if self._alarm_previous is not None:
                signal.signal(signal.SIGALRM, self._alarm_previous)
        signum = self._submitit_signal()
        handler = self._original.get(signum)
        if callable(handler):
            handler(signum, None)
