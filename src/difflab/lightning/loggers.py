"""Logger factories for the ``logger`` config group: a CSV logger that keeps what an earlier run in the same
directory wrote, and a W&B logger that never blocks (offline unless an API key is configured)."""

from __future__ import annotations

import csv
import netrc
import os
import secrets
import string
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from difflab.errors import UsageError
from difflab.extras import require
from difflab.files import write_text
from difflab.lightning.compat import wandb_run_started


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a ``metrics.csv`` already in the log directory (a run resumed into
    the same directory, e.g. after a SLURM requeue) is continued, not deleted."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


def wandb_api_key_configured() -> bool:
    """True when W&B has credentials: ``WANDB_API_KEY`` or a netrc entry for api.wandb.ai (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, project: str = "difflab", entity: str | None = None, name: str | None = None,
                 tags: list[str] | None = None, mode: str = "auto", log_model: bool = False, **kwargs):
    """A ``WandbLogger`` that never blocks on the network.

    ``mode``: ``auto`` (online when an API key is configured, else offline; ``WANDB_MODE`` in the environment
    wins), ``online``, ``offline`` or ``disabled``. The run id is kept in ``save_dir/wandb_run_id``: a run
    restarted in the same directory continues the same W&B run. Offline runs can be uploaded later with
    ``wandb sync save_dir/wandb/offline-run-*``.
    """
    require("wandb", "wandb", "logger=wandb")
    from lightning.pytorch.loggers import WandbLogger

    valid = ("auto", "online", "offline", "disabled")
    if mode not in valid:
        raise UsageError(f"unknown W&B mode {mode!r}; valid: {', '.join(valid)}")
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
    id_file = Path(save_dir) / "wandb_run_id"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:  # W&B's own id form: 8 lowercase letters and digits
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        write_text(id_file, run_id + "\n")
    return WandbLogger(save_dir=save_dir, project=project, entity=entity, name=name, tags=list(tags or []),
                       id=run_id, resume="allow", mode=mode, log_model=log_model, **kwargs)


def finish_wandb_runs(loggers) -> None:
    """End the W&B runs of ``loggers`` (Lightning's WandbLogger leaves them open until the process exits): the
    offline run file is complete when training returns, and the next job of a Hydra multirun starts its own run."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and wandb_run_started(logger):
            logger.experiment.finish()
