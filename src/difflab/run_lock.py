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


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the pid, it names one
    process, not whichever process reuses the pid later. None where there is no /proc."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat and ")" in stat else None


def _pid_namespace() -> str | None:
    """Which boot of which kernel and which pid namespace this process's pids belong to: two containers may share a
    hostname, not their pids."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return f"{boot}/{namespace}" if boot and namespace else None


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "pid_namespace": _pid_namespace(), "pid_start_time": _start_time(os.getpid()),
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

    - it was an earlier incarnation of this SLURM job (same ``SLURM_JOB_ID``, another ``SLURM_RESTART_COUNT``: SLURM
      never runs two at once), whichever node it ran on and whatever pid it had;
    - it ran in this pid namespace (same host, boot and namespace: not another container that shares the hostname)
      and its process is gone: no such pid, or a pid reused by a process started at another time;
    - otherwise its heartbeat is older than ``stale_after_s`` (a node that died, another container).

    Taking the lock is atomic: ``os.link`` of a complete file (exclusive, never seen half-written); replacing a dead
    holder's lock happens under a second exclusive file, ``.lock.takeover``, after checking that the lock is still
    the one judged dead, so of several starters exactly one takes it. A hand-written lock rather than
    ``fcntl.flock``: flock is unreliable on the network file systems run directories live on, and cannot say who
    holds it.
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
        raw = self._raw()
        return None if raw is None else self._parse(raw)

    def _raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:  # unreadable: nobody can prove they hold it
            return b""

    @staticmethod
    def _parse(raw: bytes) -> dict:
        try:
            holder = json.loads(raw)
        except ValueError:  # half-written by a killed process (an older difflab): nobody holds it
            return {}
        return holder if isinstance(holder, dict) else {}

    def holder_is_dead(self, holder: dict) -> bool:
        if not holder:
            return True
        job = holder.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"] and holder.get("slurm_restart_count") != \
                self.me["slurm_restart_count"]:
            return True
        if self._same_pid_namespace(holder):
            pid = int(holder.get("pid", -1))
            if pid == self.me["pid"] or not _pid_alive(pid):
                return True
            started = holder.get("pid_start_time")
            if started is not None and _start_time(pid) not in (None, started):
                return True  # the pid now names another process
            return False
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_s

    def _same_pid_namespace(self, holder: dict) -> bool:
        """Whether the holder's pid can be looked up here: same host, and where both know it, the same boot and pid
        namespace. A lock without that record (an older difflab) is judged by its heartbeat alone."""
        if holder.get("host") != self.me["host"]:
            return False
        return holder.get("pid_namespace") == self.me["pid_namespace"]

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{LOCK_NAME}.{self.me['host']}.{self.me['pid']}")
        mine.write_text(json.dumps(self.me))
        try:
            self._take(mine)
        finally:
            mine.unlink(missing_ok=True)
        if self.holder() != self.me:  # the lock we linked is not ours: never expected, so never ignored
            raise RunDirectoryLocked(f"could not lock {self.path}: another process replaced it as it was taken")
        self._start_heartbeat()
        return self

    def _take(self, mine: Path, attempts: int = 50) -> None:
        for _ in range(attempts):  # a holder may vanish, or another starter take over, between our looks
            try:
                os.link(mine, self.path)  # atomic and exclusive, and the lock is never seen half-written
            except FileExistsError:
                raw = self._raw()
                if raw is None:
                    continue
                holder = self._parse(raw)
                if not self.holder_is_dead(holder):
                    raise RunDirectoryLocked(self._refusal(holder)) from None
                if self._replace_dead(mine, raw):
                    self.took_over = holder
                    return
                time.sleep(0.01)
                continue
            return
        raise RunDirectoryLocked(f"could not lock {self.path}: other processes keep taking it")

    def _replace_dead(self, mine: Path, dead: bytes) -> bool:
        """Under ``.lock.takeover`` (exclusive), replace the lock with ours if it still holds ``dead``'s bytes."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            os.link(mine, guard)
        except FileExistsError:
            try:  # a starter killed while taking over (it takes microseconds): its guard is stale
                if time.time() - guard.stat().st_mtime > 10:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            if self._raw() != dead:  # replaced or released since we looked: look again
                return False
            self.path.unlink()
            try:
                os.link(mine, self.path)
            except FileExistsError:  # a starter that found no lock took it: it holds it
                return False
            return True
        finally:
            guard.unlink(missing_ok=True)

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
        if self.holder() == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
