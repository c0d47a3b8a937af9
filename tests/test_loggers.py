"""Loggers: W&B never blocks (offline without a key) and keeps its run id; CSV metrics survive a resume."""

from __future__ import annotations

import csv

import pytest

from difflab.cli.train import run
from difflab.lightning.loggers import AppendingCSVLogger, wandb_api_key_configured, wandb_logger
from test_train import make_cfg


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)


def test_wandb_mode_follows_the_credentials(tmp_path, monkeypatch, no_wandb_credentials):
    assert not wandb_api_key_configured()
    assert wandb_logger(str(tmp_path / "a"))._wandb_init["mode"] == "offline"
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert wandb_api_key_configured()
    assert wandb_logger(str(tmp_path / "b"))._wandb_init["mode"] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's explicit choice wins
    assert wandb_logger(str(tmp_path / "c"))._wandb_init["mode"] == "disabled"
    with pytest.raises(ValueError, match="auto, online, offline, disabled"):
        wandb_logger(str(tmp_path / "d"), mode="sometimes")


def test_wandb_offline_training_keeps_its_run_id(tmp_path, no_wandb_credentials):
    run(make_cfg(tmp_path, "logger=wandb", "trainer.max_steps=2"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and offline_runs[0].name.endswith(run_id)
    # restarted in the same directory: the same W&B run continues
    run(make_cfg(tmp_path, "logger=wandb", "trainer.max_steps=4",
                 f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"))
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_csv_metrics_are_continued_not_deleted_on_resume(tmp_path):
    run(make_cfg(tmp_path, "trainer.max_steps=2"))
    run(make_cfg(tmp_path, "trainer.max_steps=4", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"))
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        steps = {int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")}
    assert steps == {0, 1, 2, 3}
    assert (tmp_path / "csv" / "hparams.yaml").read_text().count("network:") >= 1  # the composed config


def test_appending_csv_logger_widens_the_header(tmp_path):
    first = AppendingCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    second = AppendingCSVLogger(tmp_path, name="csv", version="")
    second.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    second.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [("0", "1.0", ""), ("1", "2.0", "3.0")]
