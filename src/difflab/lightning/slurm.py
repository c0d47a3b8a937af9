"""SLURM requeue with one mechanism: ``LastCheckpoint`` writes ``checkpoints/last.ckpt`` at the end of the step a
SIGUSR1 arrives in, then rank zero requeues the job; ``ckpt_path=auto`` resumes from it.

Lightning's own auto-requeue is turned off: its handler saves ``hpc_ckpt_<n>.ckpt`` from inside the signal handler
(mid-step, a collective inside a handler under DDP, loggers finalized as "finished"), and restores it only when
``ckpt_path`` is None, so next to ``ckpt_path=auto`` a requeued job resumed from the last periodic checkpoint.
``hpc_ckpt_*`` files that an older run left are still considered, by age, and pruned once a newer checkpoint exists.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

HPC_PATTERN = "hpc_ckpt_*.ckpt"


def cluster_plugins() -> list:
    """Under SLURM, the cluster environment Lightning would detect, with its auto-requeue off (see above)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9]+(_[0-9]+)?", job) else None


def requeue() -> bool:
    """``scontrol requeue <job>``: SLURM stops this job and queues it again (with ``#SBATCH --requeue``)."""
    job = job_id()
    if job is None:
        rank_zero_warn("SIGUSR1 under SLURM but no usable SLURM_JOB_ID: the job is not requeued")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        rank_zero_warn(f"could not requeue SLURM job {job}: {error}; resubmit it with ckpt_path=auto")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()[-300:]}; "
                       "resubmit the job with ckpt_path=auto (was it submitted with --requeue?)")
        return False
    rank_zero_info(f"requeued SLURM job {job}")
    return True


def newest_checkpoint(last: Path, run_dir: Path) -> Path | None:
    """The newest (by modification time) of ``last`` and the run directory's ``hpc_ckpt_*.ckpt``; None if none."""
    ages = {}
    for path in (last, *Path(run_dir).glob(HPC_PATTERN)):
        try:  # rank zero may be pruning an older hpc file meanwhile
            if path.is_file():
                ages[path] = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    return max(ages, key=ages.get) if ages else None


def prune_hpc_checkpoints(run_dir: Path, keep: Path | None) -> list[Path]:
    """Remove the run directory's ``hpc_ckpt_*.ckpt`` older than ``keep`` (all of them if ``keep`` is newer)."""
    if keep is None or not keep.is_file():
        return []
    newest = keep.stat().st_mtime_ns
    removed = []
    for path in Path(run_dir).glob(HPC_PATTERN):
        if path != keep and path.stat().st_mtime_ns <= newest:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
