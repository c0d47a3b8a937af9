"""The Lightning internals difflab relies on, in one place; tests/test_lightning_compat.py fails when they change.

Each has no public equivalent in Lightning 2.6: said per function. The CSV logger that continues a resumed run's
metrics.csv (``loggers.AppendingCSVLogger``) subclasses ``CSVLogger`` / ``ExperimentWriter`` internals too
(``_experiment``, ``_fs``, ``_check_log_dir_exists``, ``metrics_keys``); the test checks those as well.
"""

from __future__ import annotations

import lightning as L


def logs_this_step(trainer: L.Trainer | None) -> bool:
    """Whether the loggers write at this step (every ``log_every_n_steps``): Lightning decides it in its logger
    connector and exposes no public flag. True outside a trainer."""
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None else bool(connector.should_update_logs)


def cluster_environment(trainer: L.Trainer):
    """The cluster environment Lightning's signal connector consults (single-device strategies carry none
    themselves, so ``trainer.strategy.cluster_environment`` can be None while SLURM is detected)."""
    return getattr(trainer._accelerator_connector, "cluster_environment", None) or \
        getattr(trainer.strategy, "cluster_environment", None)


def last_saved_step(checkpoint_callback) -> int:
    """The global step of ModelCheckpoint's last save (-1 if none or no callback)."""
    return getattr(checkpoint_callback, "_last_global_step_saved", -1) if checkpoint_callback is not None else -1


def wandb_run_started(logger) -> bool:
    """Whether a WandbLogger has created its run (``logger.experiment`` would start one)."""
    return getattr(logger, "_experiment", None) is not None


def checkpoint_every_n_steps(checkpoint_callback) -> int | None:
    """ModelCheckpoint's ``every_n_train_steps`` (it keeps the argument under a private name only)."""
    return getattr(checkpoint_callback, "_every_n_train_steps", None)


def record_metric(trainer: L.Trainer, name: str, value: float) -> None:
    """Put a value among ``trainer.callback_metrics`` where ``self.log`` is not allowed (``on_train_end``): that
    dict is the one Lightning keeps and hands out, and what difflab's metrics.json is written from."""
    import torch

    trainer.callback_metrics[name] = torch.tensor(value)
