"""Loggers: W&B never blocks (offline without a key) and keeps its run id; CSV metrics survive a resume."""

from __future__ import annotations

import csv
import time

import pytest

from configs import make_cfg
from difflab.cli.train import run
from difflab.lightning.loggers import AppendingCSVLogger, wandb_api_key_configured, wandb_logger


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


def wandb_records(run_dir):
    """Every record of an offline W&B run's .wandb file (what `wandb sync` uploads), as protobufs. The file is
    W&B's LevelDB-log format: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records with
    7-byte headers (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); no Python reader ships with wandb 0.31."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # too little room for a header: the block's tail is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):  # a record still being written
            break
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
    return records


def test_wandb_offline_run_holds_metrics_images_and_config(tmp_path, no_wandb_credentials):
    import json

    run(make_cfg(tmp_path, "logger=wandb", "trainer.max_steps=4", "callbacks=fid", "callbacks.fid.every_n_steps=2",
                 "callbacks.fid.num_samples=8", "callbacks.fid.batch_size=8", "callbacks.fid.sampler.num_steps=2"))
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    records = wandb_records(run_dir)
    # run.finish() returns once the service has handled the exit; wandb-core's store may flush its buffered file a
    # moment later (seen once on a loaded CI machine: only the header on disk), so wait for the exit record.
    deadline = time.monotonic() + 60
    while not any(r.HasField("exit") for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = wandb_records(run_dir)
    assert any(r.HasField("exit") for r in records), "the offline run file never received its exit record"
    history = [{item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.HasField("history")]
    keys = set().union(*history)
    assert {"train/loss", "val/loss", "train/grad_norm", "lr-AdamW", "val/fid_8", "train/loss_t0"} <= keys
    images = [h[f"{key}._type"] for h in history for key in ("samples", "fid_samples") if f"{key}._type" in h]
    assert len(images) >= 4 and set(images) == {"images/separated"}  # grids at steps 2 and 4, both kinds
    fid_steps = sorted(h["trainer/global_step"] for h in history if "val/fid_8" in h)
    assert fid_steps == [2, 4]  # FID over time
    media = list(run_dir.glob("files/media/images/*.png"))
    assert len(media) >= 3  # the grids themselves, next to the records
    config = {}
    for r in records:
        if r.HasField("config"):
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config["network"]["_target_"] == "difflab.nn.UNet" and config["schedule"]["_target_"]  # the composed config
