"""A preemption signal to a running training saves a checkpoint and stops; the same command with
ckpt_path=auto resumes from it: same step, EMA and W&B run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def command(run_dir: Path, max_steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", "ckpt_path=auto", "data=digits",
            "network=tiny", "data.batch_size=16", f"trainer.max_steps={max_steps}", "trainer.max_time=null",
            "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "logger=wandb",
            "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=5",
            "sampler.num_steps=2"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_then_the_same_command_resumes(tmp_path, signum):
    env = {**os.environ, "HOME": str(tmp_path), "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command(run_dir, 100000), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert last.exists(), first.communicate()[0][-3000:]
    time.sleep(1.0)  # a few more steps
    first.send_signal(signum)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output[-3000:]
    saved = torch.load(last, map_location="cpu", weights_only=True)
    step = saved["global_step"]
    assert step > 5 and f"{signal.Signals(signum).name}: saved" in output  # not just the periodic checkpoint
    assert int(saved["state_dict"]["ema_updates"]) == step
    run_id = (run_dir / "wandb_run_id").read_text().strip()

    second = subprocess.run(command(run_dir, step + 3), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=180)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == step + 3  # continued, not restarted
    assert int(resumed["state_dict"]["ema_updates"]) == step + 3
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*"))


def test_last_checkpoint_is_written_where_training_stops(tmp_path):
    """ModelCheckpoint saves every N steps; last.ckpt must still hold the final step (here 3, N = 2)."""
    from configs import make_cfg
    from difflab.cli.train import run

    run(make_cfg(tmp_path, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=2"))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert torch.load(tmp_path / "checkpoints" / "step_000002.ckpt", weights_only=True)["global_step"] == 2
