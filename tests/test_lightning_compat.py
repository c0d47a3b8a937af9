"""The Lightning internals of difflab.lightning.compat (and the CSV logger's) still exist and mean what we read."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from difflab.lightning import compat


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.logged_steps = []

    def training_step(self, batch, batch_idx):
        if compat.logs_this_step(self.trainer):
            self.logged_steps.append(self.trainer.global_step)
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_logs_this_step_follows_log_every_n_steps_and_last_saved_step(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 2)), batch_size=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5)
    trainer = L.Trainer(max_steps=12, log_every_n_steps=4, logger=CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint], default_root_dir=tmp_path)
    probe = Probe()
    trainer.fit(probe, data)
    assert probe.logged_steps == [3, 7, 11]  # Lightning writes when (step + 1) % 4 == 0
    assert compat.logs_this_step(None)
    assert compat.last_saved_step(checkpoint) == 10 and compat.last_saved_step(None) == -1


def test_cluster_environment_is_the_one_the_trainer_detected(monkeypatch):
    assert isinstance(compat.cluster_environment(L.Trainer(logger=False)), LightningEnvironment)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert isinstance(compat.cluster_environment(L.Trainer(logger=False)), SLURMEnvironment)


def test_csv_logger_internals_our_appending_logger_overrides(tmp_path):
    logger = CSVLogger(tmp_path)
    assert logger._experiment is None and hasattr(logger, "_fs")
    assert not compat.wandb_run_started(logger)
    writer = ExperimentWriter(log_dir=str(tmp_path / "w"))
    assert hasattr(writer, "metrics_keys") and hasattr(writer, "metrics_file_path") and hasattr(writer, "_fs")
    assert "_check_log_dir_exists" in dict(inspect.getmembers(ExperimentWriter))


def test_wandb_run_started_reads_the_logger_it_is_given():
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir="/tmp/unused")
    assert not compat.wandb_run_started(logger)  # no run until .experiment is touched


def test_checkpoint_interval_and_recorded_metrics_reach_what_callbacks_read(tmp_path):
    assert compat.checkpoint_every_n_steps(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7)) == 7

    class Recorder(L.Callback):
        def on_train_end(self, trainer, pl_module):
            compat.record_metric(trainer, "val/late", 1.5)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[Recorder()], default_root_dir=tmp_path)
    trainer.fit(Probe(), data)
    assert float(trainer.callback_metrics["val/late"]) == 1.5
