"""One live training process per run directory: a lock file with a heartbeat, taken over when its holder is dead."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from difflab.errors import RunStopped

LOCK_NAME = ".lock"


class RunDirectoryLocked(RunStopped):
    """Another live process trains in this run directory."""


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """``<run dir>/.lock`` holds the pid, host and SLURM job of the process training there; a daemon thread touches
    it every ``heartbeat_s``. A second process refuses to start (``RunDirectoryLocked``: a requeue overlapping its
    predecessor, the same command in two terminals) unless the holder is dead:

    - on the same host, its pid is gone (a SIGKILL, an OOM kill);
    - it was an earlier incarnation of this SLURM job (same ``SLURM_JOB_ID``, another ``SLURM_RESTART_COUNT``: SLURM
      never runs two at once);
    - otherwise its heartbeat is older than ``stale_after_s`` (a node that died).

    A hand-written lock file rather than ``fcntl.flock``: flock is unreliable on the network file systems run
    directories live on, and cannot say who holds it.
    """

    def __init__(self, run_dir: str | os.PathLike, heartbeat_s: float = 30.0, stale_after_s: float = 120.0):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.me = _this_process()
        self.took_over: dict | None = None  # the dead holder this process replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half-written by a killed process: nobody holds it
            return {}

    def holder_is_dead(self, holder: dict) -> bool:
        if not holder:
            return True
        if holder.get("host") == self.me["host"]:
            return holder.get("pid") == self.me["pid"] or not _pid_alive(int(holder.get("pid", -1)))
        job = holder.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"] and holder.get("slurm_restart_count") != \
                self.me["slurm_restart_count"]:
            return True
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_s

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{LOCK_NAME}.{self.me['host']}.{self.me['pid']}")
        mine.write_text(json.dumps(self.me))
        try:
            self._take(mine)
        finally:
            mine.unlink(missing_ok=True)
        self._start_heartbeat()
        return self

    def _take(self, mine: Path) -> None:
        for _ in range(3):  # a holder may vanish between our looks
            try:
                os.link(mine, self.path)  # atomic and exclusive, and the lock is never seen half-written
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue
                if not self.holder_is_dead(holder):
                    raise RunDirectoryLocked(self._refusal(holder)) from None
                self.took_over = holder
                self.path.unlink(missing_ok=True)
                continue
            return
        raise RunDirectoryLocked(f"could not lock {self.path}: other processes keep taking it")

    def _refusal(self, holder: dict) -> str:
        where = f"process {holder.get('pid')} on {holder.get('host')}"
        if holder.get("slurm_job_id"):
            where += f" (SLURM job {holder['slurm_job_id']})"
        return (f"run directory {self.path.parent} is in use by {where}, started {holder.get('started')}: a second "
                f"run would interleave its checkpoints. Wait for it or stop it, or choose another hydra.run.dir "
                f"(a lock whose process died is taken over; from another host after {self.stale_after_s:.0f} s; "
                f"if no run uses it, delete {self.path})")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:  # the folder moved or the disk is gone: the run itself will say so
                    pass

        self._thread = threading.Thread(target=beat, name="difflab-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.holder()
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
