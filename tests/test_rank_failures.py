"""One rank's failure stops every rank, at once and with the same message: two CPU ranks (gloo) started as srun
starts them (faked SLURM variables, one process per rank), each failing on one rank only. Without this the other
rank waits at its next collective until the timeout (30 minutes)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import write_shapes

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "network=tiny", "data.batch_size=8",
          "trainer.max_time=null", "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false",
          "callbacks.sample_grid.every_n_steps=0", "sampler.num_steps=2"]
LIMIT_S = 120  # each rank must be gone well before this; the collective timeout is 1800 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, overrides: list[str], rank_zero_prefix: list[str] | None = None) -> list[tuple[int, str]]:
    """Both ranks' exit status and output; a rank still running after LIMIT_S is killed and reported as None."""
    env = {**os.environ, "SLURM_JOB_ID": str(random.randint(1000, 9999)), "SLURM_JOB_NAME": "difflab",
           "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "DIFFLAB_RUN_DIR": str(tmp_path / "run"), "HOME": str(tmp_path), "WANDB_MODE": "disabled"}
    ranks = []
    for rank in (0, 1):
        prefix = rank_zero_prefix if rank == 0 and rank_zero_prefix else [sys.executable]
        ranks.append(subprocess.Popen([*prefix, str(ROOT / "train.py"), *COMMON, *overrides], cwd=tmp_path,
                                      env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline, results = time.time() + LIMIT_S, []
    for process in ranks:
        try:
            output = process.communicate(timeout=max(1.0, deadline - time.time()))[0]
            results.append((process.returncode, output))
        except subprocess.TimeoutExpired:
            process.kill()
            results.append((None, process.communicate()[0]))
    return results


def assert_all_stopped_with(results: list[tuple[int, str]], message: str) -> None:
    if os.environ.get("SHOW_RANKS"):
        for code, output in results:
            print(code, output[-2500:])
    for rank, (code, output) in enumerate(results):
        assert code is not None, f"rank {rank} still running after {LIMIT_S} s:\n{output[-3000:]}"
        assert code != 0 and message in output, f"rank {rank} (exit {code}):\n{output[-3000:]}"


@pytest.mark.slow
def test_a_checkpoint_write_failing_on_rank_zero_stops_both_ranks(tmp_path):
    # rank zero may not write a file over 300 kB (RLIMIT_FSIZE, SIGXFSZ ignored): a real failure inside torch.save
    limit = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY)); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    results = run_ranks(tmp_path, ["data=digits", "trainer.max_steps=50",
                                   "callbacks.checkpoint.every_n_train_steps=2"],
                        rank_zero_prefix=[sys.executable, "-c", limit])
    assert_all_stopped_with(results, "could not write checkpoint")


@pytest.mark.slow
def test_a_run_lock_refused_on_rank_zero_stops_both_ranks(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        from difflab.run_lock import RunLock, _start_time

        run_dir = tmp_path / "run"
        run_dir.mkdir()
        holder = {**RunLock(run_dir).me, "pid": sleeper.pid, "pid_start_time": _start_time(sleeper.pid),
                  "slurm_job_id": None}  # a live process on this host
        (run_dir / ".lock").write_text(json.dumps(holder))
        results = run_ranks(tmp_path, ["data=digits", "trainer.max_steps=5"])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert_all_stopped_with(results, f"is in use by process {sleeper.pid}")


@pytest.mark.slow
def test_the_skip_limit_reached_by_one_rank_stops_both_ranks(tmp_path):
    """One unreadable file among 48 with max_skip_fraction=0: exactly one rank reads it (each rank reads its own
    half of the data) and is over the limit at that batch; the other rank never is."""
    root = write_shapes(tmp_path / "shapes", per_class=16, size=8)
    next(root.rglob("*.png")).write_bytes(b"")
    results = run_ranks(tmp_path, ["data=imagefolder", f"data.root={root}", "data.image_size=8", "data.channels=3",
                                   "data.num_workers=0", "data.on_error=skip", "data.max_skip_fraction=0",
                                   "trainer.max_steps=50"])
    assert_all_stopped_with(results, "more than data.max_skip_fraction=0")
