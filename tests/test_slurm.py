"""The SLURM path with faked SLURM variables: Lightning's SLURMEnvironment with auto-requeue owns SIGUSR1 (our
LastCheckpoint keeps SIGTERM), ranks come from SLURM, and DIFFLAB_RUN_DIR fixes the run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from configs import make_cfg
from difflab.cli.train import build
from difflab.lightning.last_checkpoint import LastCheckpoint

ROOT = Path(__file__).resolve().parent.parent
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "difflab", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
         "SLURM_NODELIST": "localhost"}


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_slurm_environment_owns_the_requeue_signal(tmp_path, monkeypatch):
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen["environment"] = trainer._accelerator_connector.cluster_environment
            seen["usr1"], seen["term"] = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
            seen["rank"], seen["world"] = trainer.global_rank, trainer.world_size

    model, datamodule, trainer = build(make_cfg(tmp_path, "trainer.max_steps=1"))
    trainer.callbacks.append(Probe())
    trainer.fit(model, datamodule=datamodule)
    assert isinstance(seen["environment"], SLURMEnvironment) and seen["environment"].auto_requeue
    assert seen["environment"].job_id() == 4242 and (seen["rank"], seen["world"]) == (0, 1)
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    assert seen["usr1"] not in (signal.SIG_DFL, last._handler)  # Lightning's requeue handler, not ours
    assert seen["term"] == last._handler  # preemption without a time limit: ours saves last.ckpt


def test_run_dir_from_the_environment(tmp_path):
    run_dir = tmp_path / "slurm" / "4242"
    env = {**os.environ, "DIFFLAB_RUN_DIR": str(run_dir), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "data=digits", "network=tiny",
                             "trainer.max_steps=1", "trainer.max_time=null", "trainer.enable_progress_bar=false",
                             "callbacks.sample_grid.every_n_steps=0", "sampler.num_steps=2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
