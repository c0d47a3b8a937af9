"""trainer=fsdp (FSDP2) with two CPU processes (gloo): the same weights and EMA as DDP, one checkpoint file that a
single process samples from, resume to the same step and EMA count, sharded checkpoints, gradient checkpointing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import make_cfg
from difflab.cli.train import run
from difflab.errors import UsageError
from difflab.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["data=digits", "network=tiny", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
          "trainer.max_time=null", "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false",
          "callbacks.sample_grid.every_n_steps=0", "data.batch_size=8", "data.num_workers=0", "model.ema_decay=0.9",
          "sampler.num_steps=2", "callbacks.checkpoint.every_n_train_steps=4", "lr_scheduler=constant"]


def train(tmp_path: Path, run_dir: Path, *overrides: str) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(DIFFLAB_RUN_DIR=str(run_dir), HOME=str(tmp_path))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *COMMON, *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def state(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_fsdp_trains_like_ddp_checkpoints_one_file_and_resumes(tmp_path):
    train(tmp_path, tmp_path / "fsdp", "trainer=fsdp", "trainer.max_steps=4", "network.gradient_checkpointing=true")
    train(tmp_path, tmp_path / "ddp", "trainer=ddp", "trainer.max_steps=4")
    fsdp, ddp = state(tmp_path / "fsdp"), state(tmp_path / "ddp")
    assert fsdp["global_step"] == 4 and int(fsdp["state_dict"]["ema_updates"]) == 4
    assert fsdp["state_dict"].keys() == ddp["state_dict"].keys()  # plain names: no sharding wrappers
    for key, value in ddp["state_dict"].items():  # the same batches, the same averaged gradients
        torch.testing.assert_close(fsdp["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert any(not torch.equal(fsdp["state_dict"][k], fsdp["state_dict"]["model.network." + k[4:]])
               for k in fsdp["state_dict"] if k.startswith("ema."))
    model = load_model(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")  # one process, no sharding
    assert model.pipeline()(2, label=3, seed=0, progress=False).shape == (2, 1, 8, 8)
    train(tmp_path, tmp_path / "fsdp", "trainer=fsdp", "trainer.max_steps=6", "network.gradient_checkpointing=true")
    resumed = state(tmp_path / "fsdp")
    assert resumed["global_step"] == 6 and int(resumed["state_dict"]["ema_updates"]) == 6


@pytest.mark.slow
def test_sharded_checkpoints_resume_and_are_refused_by_the_readers(tmp_path):
    run_dir = tmp_path / "run"
    train(tmp_path, run_dir, "trainer=fsdp", "trainer.strategy.sharded_checkpoints=true", "trainer.max_steps=4")
    assert (run_dir / "checkpoints" / "last.ckpt").is_dir()
    train(tmp_path, run_dir, "trainer=fsdp", "trainer.strategy.sharded_checkpoints=true", "trainer.max_steps=6")
    assert (run_dir / "checkpoints" / "step_000004.ckpt").is_dir()
    with pytest.raises(UsageError, match="is a sharded checkpoint \\(trainer=fsdp with sharded_checkpoints=true\\)"):
        load_model(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(UsageError, match="its index is unpickled, so only a run's own are resumed"):
        run(make_cfg(tmp_path / "other", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
