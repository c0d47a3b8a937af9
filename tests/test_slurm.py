"""The SLURM path with faked SLURM variables: ranks come from Lightning's SLURMEnvironment, whose auto-requeue is
off; difflab's LastCheckpoint owns SIGUSR1 (save last.ckpt at the step's end, then ``scontrol requeue``) and
SIGTERM; ``ckpt_path=auto`` resumes at the signalled step; DIFFLAB_RUN_DIR fixes the run directory."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from configs import make_cfg
from difflab.cli.train import build
from difflab.lightning.last_checkpoint import LastCheckpoint

ROOT = Path(__file__).resolve().parent.parent
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "difflab", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
         "SLURM_NODELIST": "localhost"}


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_last_checkpoint_owns_the_requeue_signal(tmp_path, monkeypatch):
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
    assert isinstance(seen["environment"], SLURMEnvironment) and not seen["environment"].auto_requeue
    assert seen["environment"].job_id() == 4242 and (seen["rank"], seen["world"]) == (0, 1)
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    assert seen["usr1"] == last._handler  # the time-limit notice: ours saves last.ckpt, then requeues
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


def drill_command(run_dir: Path, max_steps: int, start_file: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "ckpt_path=auto", "data=digits", "network=tiny",
            "data.batch_size=16", f"trainer.max_steps={max_steps}", "trainer.max_time=null",
            "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false",
            "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=10",
            "sampler.num_steps=2", "+callbacks.start._target_=step_probe.StartStep",
            f"+callbacks.start.out={start_file}"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_requeue_drill_resumes_at_the_signalled_step(tmp_path):
    """sbatch --signal=SIGUSR1@90 --requeue, acted out: SIGUSR1 at a random step; the job saves and asks SLURM to
    requeue it (a fake scontrol records the call and kills the job, as SLURM does); the requeued job, with
    ckpt_path=auto, starts at the signalled step, not at the last periodic checkpoint (every 10 steps)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    run_dir = tmp_path / "outputs" / "slurm" / "4242"
    env = {**os.environ, **SLURM, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DIFFLAB_RUN_DIR": str(run_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "HOME": str(tmp_path), "WANDB_MODE": "disabled"}
    first = subprocess.Popen(drill_command(run_dir, 100000, tmp_path / "start1"), cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert last.exists(), first.communicate()[0][-3000:]
    time.sleep(random.uniform(0.5, 2.5))  # a random step past the first periodic checkpoint
    first.send_signal(signal.SIGUSR1)
    output = first.communicate(timeout=120)[0]
    match = re.search(r"SIGUSR1: saved \S+ at step (\d+)", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert calls.read_text().split() == ["requeue", "4242"]  # rank zero asked SLURM to requeue this job
    assert not list(run_dir.glob("hpc_ckpt_*"))  # one mechanism: last.ckpt only
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: same id, same run directory
    second = subprocess.run(drill_command(run_dir, step + 2, tmp_path / "start2"), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert int((tmp_path / "start2").read_text()) == step  # resumed at the signalled step
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 2


def test_auto_resumes_the_newest_of_last_and_hpc_checkpoints(tmp_path):
    """An hpc_ckpt left by Lightning's requeue (an older difflab, a user's own plugin) is resumed when it is newer
    than last.ckpt; the older ones are removed."""
    from difflab.training import resume_path

    cfg = make_cfg(tmp_path, "ckpt_path=auto")
    _, _, trainer = build(cfg)
    run_dir, last = Path(trainer.default_root_dir), LastCheckpoint.checkpoint_path(trainer)
    last.parent.mkdir(parents=True, exist_ok=True)
    for age, path in ((300, run_dir / "hpc_ckpt_1.ckpt"), (200, last), (100, run_dir / "hpc_ckpt_2.ckpt")):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))
    assert resume_path(cfg, trainer) == str(run_dir / "hpc_ckpt_2.ckpt")
    assert not (run_dir / "hpc_ckpt_1.ckpt").exists() and last.exists()
    os.utime(last)  # a newer last.ckpt wins, and the hpc file goes
    assert resume_path(cfg, trainer) == str(last)
    assert not list(run_dir.glob("hpc_ckpt_*"))
