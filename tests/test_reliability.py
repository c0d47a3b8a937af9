"""Long-run reliability: non-finite steps skipped and a diverged run stopped, checkpoints always whole and finite,
resume exact wherever the run directory lives, one live process per run directory, SIGKILL at any point."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from configs import make_cfg
from difflab.cli.train import build, run
from difflab.lightning import checkpoint_io
from difflab.lightning.checkpoint_io import (
    CheckpointWriteError,
    NonFiniteCheckpointError,
    SafeCheckpointIO,
    non_finite_tensors,
)
from difflab.lightning.nonfinite_guard import NonFiniteGuard, TrainingDiverged
from difflab.run_lock import RunDirectoryLocked, RunLock

REPO = Path(__file__).resolve().parents[1]


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- the non-finite guard -------------------------------------------------------------------------------------


def test_divergence_stops_within_k_steps_naming_the_last_good_checkpoint_and_writes_nothing_non_finite(tmp_path):
    # the drill, shrunk: lr 5 makes the loss NaN within a few steps and it never recovers
    cfg = make_cfg(tmp_path, "optim.lr=5", "lr_scheduler=constant", "trainer.max_steps=200",
                   "callbacks.checkpoint.every_n_train_steps=1", "callbacks.nonfinite_guard.max_consecutive=5",
                   "callbacks.sample_grid.every_n_steps=0", "trainer.val_check_interval=1000")
    with pytest.raises(TrainingDiverged, match=r"non-finite for 5 steps in a row \(steps (\d+)-(\d+)\)") as info:
        run(cfg)
    message = str(info.value)
    first, last = (int(s) for s in re.search(r"steps (\d+)-(\d+)", message).groups())
    assert last - first == 4 and last < 100  # stopped within K steps of the first NaN, far before max_steps
    written = checkpoints(tmp_path)
    assert written, "the steps before the first NaN were checkpointed"
    for path in written:  # no file holds a NaN / inf; none was written after the loss went non-finite
        state = load(path)
        assert not non_finite_tensors(state["state_dict"]), path
        assert state["global_step"] <= first, (path, state["global_step"], first)
    good = re.search(r"last good checkpoint is (\S+) \(step (\d+)\)", message)
    assert good is not None, message
    assert Path(good.group(1)).is_file() and int(good.group(2)) < first
    assert load(Path(good.group(1)))["global_step"] == int(good.group(2))


class NaNGradients(L.Callback):
    """Makes the gradients NaN at the given steps, and records the weights around them."""

    def __init__(self, steps: set[int]):
        self.steps, self.before, self.after = steps, {}, {}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.network.parameters()]
            next(p for p in pl_module.network.parameters() if p.grad is not None).grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step - 1  # the step this batch attempted
        if step in self.steps:
            self.after[step] = [p.detach().clone() for p in pl_module.network.parameters()]


def test_a_few_non_finite_steps_are_skipped_without_touching_weights_optimizer_or_ema(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=8", "callbacks.sample_grid.every_n_steps=0")
    model, datamodule, trainer = build(cfg)
    nan = NaNGradients({3, 4})
    trainer.callbacks.append(nan)
    trainer.fit(model, datamodule=datamodule)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped == 2 and guard.consecutive == 0
    for step in (3, 4):
        for before, after in zip(nan.before[step], nan.after[step], strict=True):
            assert torch.equal(before, after)  # no update at all, weight decay included
    assert trainer.global_step == 8 and int(model.ema_updates) == 6  # the EMA skipped the same two steps
    opt_step = int(next(iter(trainer.optimizers[0].state_dict()["state"].values()))["step"])
    assert opt_step == 6  # AdamW's moments and step count untouched by the skipped steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2


# ---- checkpoint files -----------------------------------------------------------------------------------------


def test_fp16_grad_scaler_overflows_are_not_non_finite_steps(tmp_path):
    """fp16 with a GradScaler overflows routinely (here for the first ~25 steps, from a scale of 2^40): those steps
    are the scaler's to skip, so the guard neither counts them nor holds the checkpoints due meanwhile, and the EMA
    is updated once per step the optimizer really took."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.precision import MixedPrecision

    model, datamodule, _ = build(make_cfg(tmp_path, "trainer.max_steps=40"))
    guard, scaler = NonFiniteGuard(max_consecutive=5), torch.amp.GradScaler("cpu", init_scale=2.0**40,
                                                                            growth_interval=10_000)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path,
                        plugins=[SafeCheckpointIO(), MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                        callbacks=[guard, ModelCheckpoint(tmp_path / "checkpoints", "step_{step}", save_top_k=-1,
                                                          every_n_train_steps=10, auto_insert_metric_name=False)])
    trainer.fit(model, datamodule=datamodule)
    overflows = round(math.log2(2.0**40 / scaler.get_scale()))  # the scale halves at each overflow, and only then
    assert 10 < overflows < 40 and guard.skipped == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        f"step_{n}.ckpt" for n in (10, 20, 30, 40)]
    assert int(model.ema_updates) == 40 - overflows


def test_a_checkpoint_with_non_finite_weights_is_refused_and_not_written(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(NonFiniteCheckpointError, match="net.w"):
        io.save_checkpoint({"global_step": 4, "state_dict": {"net.w": torch.tensor([1.0, float("inf")])}}, path)
    assert load(path)["global_step"] == 3
    assert io.last_written(before_step=10) == (3, str(path))


def test_a_full_disk_leaves_the_previous_checkpoint_loadable_and_says_so(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, path)

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # some bytes made it before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*previous last.ckpt is intact") as info:
        io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(3)}}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load(path)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_write_that_really_fails_is_named_and_keeps_the_previous_checkpoint(tmp_path):
    """A real failure, not a patched exception: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the write
    fail with EFBIG inside torch's zip writer, which raises a RuntimeError, as it does on a full disk."""
    pytest.importorskip("resource")
    code = f"""
import json, resource, signal, torch
from pathlib import Path
from difflab.lightning.checkpoint_io import CheckpointWriteError, SafeCheckpointIO
path = Path({str(tmp_path / "checkpoints" / "last.ckpt")!r})
io = SafeCheckpointIO()
io.save_checkpoint({{"global_step": 2, "state_dict": {{"w": torch.ones(3)}}}}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    io.save_checkpoint({{"global_step": 4, "state_dict": {{"w": torch.zeros(1_000_000)}}}}, path)
    print(json.dumps({{"raised": None}}))
except Exception as err:
    print(json.dumps({{"raised": type(err).__name__, "message": str(err)}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["raised"] == "CheckpointWriteError", outcome
    assert "could not write checkpoint" in outcome["message"] and "previous last.ckpt is intact" in outcome["message"]
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_run_whose_disk_fills_stops_with_the_previous_last_checkpoint_intact(tmp_path, monkeypatch):
    real_save = torch.save

    def fails_after_step_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step", 0) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", fails_after_step_2)
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint"):
        run(make_cfg(tmp_path, "trainer.max_steps=6", "callbacks.sample_grid.every_n_steps=0"))
    monkeypatch.undo()
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no partial file


# ---- resume wherever the run directory lives ----------------------------------------------------------------


def test_a_copied_run_directory_resumed_twice_keeps_one_last_checkpoint_at_the_final_step(tmp_path):
    quiet = ["callbacks.sample_grid.every_n_steps=0", "trainer.val_check_interval=1000"]
    run(make_cfg(tmp_path / "a", "trainer.max_steps=4", *quiet))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for max_steps in (6, 8):  # ckpt_path=auto: the copy's own last.ckpt
        trainer = run(make_cfg(tmp_path / "b", f"trainer.max_steps={max_steps}", *quiet))
        assert trainer.global_step == max_steps
    names = [p.name for p in checkpoints(tmp_path / "b")]
    assert not [n for n in names if "-v" in n], names  # Lightning's last-v1.ckpt / step_000006-v1.ckpt
    state = load(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 8 and int(state["state_dict"]["ema_updates"]) == 8


def test_lightnings_fsdp1_names_are_refused_for_trainer_fsdp(tmp_path):
    """FSDP1 shards the EMA copy as one flat parameter with the network's: trainer=fsdp (FSDP2) is the way."""
    with pytest.raises(ValueError, match="trainer.strategy=fsdp is Lightning's FSDP1, .* use trainer=fsdp"):
        build(make_cfg(tmp_path, "+trainer.strategy=fsdp"))


# ---- one live process per run directory --------------------------------------------------------------------


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def write_lock(run_dir: Path, **holder) -> Path:
    """A lock as a process in this pid namespace writes it (unless ``holder`` says otherwise)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    path.write_text(json.dumps({"started": "earlier", "pid_namespace": RunLock(run_dir).me.get("pid_namespace"),
                                **holder}))
    return path


def test_a_second_live_process_on_the_run_directory_is_refused_and_nothing_is_written(tmp_path, sleeper):
    write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname())
    with pytest.raises(RunDirectoryLocked, match=rf"in use by process {sleeper.pid}.*hydra.run.dir"):
        run(make_cfg(tmp_path, "trainer.max_steps=2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing of ours written beside it
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid  # the holder's lock stands


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, sleeper):
    sleeper.kill()
    sleeper.wait()
    write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname())
    (tmp_path / "checkpoints").mkdir()
    partial = tmp_path / "checkpoints" / f".last.ckpt.tmp-{sleeper.pid}"
    partial.write_bytes(b"half")
    trainer = run(make_cfg(tmp_path, "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"))
    assert trainer.global_step == 2
    assert not partial.exists()  # the dead writer's partial file is cleared
    assert not (tmp_path / ".lock").exists()  # released at the end


def test_lock_staleness_on_other_hosts_and_slurm_requeues(tmp_path, monkeypatch):
    path = write_lock(tmp_path, pid=1, host="another-node", slurm_job_id=None)
    with pytest.raises(RunDirectoryLocked, match="another-node"):  # fresh heartbeat: alive
        RunLock(tmp_path).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))  # its heartbeat stopped ten minutes ago: the node died
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over["host"] == "another-node"
    lock.release()

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, pid=1, host="another-node", slurm_job_id="42", slurm_restart_count="0")
    lock = RunLock(tmp_path).acquire()  # the same job's earlier incarnation: SLURM never runs both
    assert lock.took_over["slurm_restart_count"] == "0"
    lock.release()
    write_lock(tmp_path, pid=1, host="another-node", slurm_job_id="42", slurm_restart_count="1")
    with pytest.raises(RunDirectoryLocked):  # the same incarnation on another node: a live overlap
        RunLock(tmp_path).acquire()


def test_a_requeue_on_the_same_node_takes_over_even_if_the_old_pid_is_alive(tmp_path, monkeypatch, sleeper):
    """SLURM never runs two incarnations of a job: the earlier one's pid, reused here by a live process, proves
    nothing."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname(), slurm_job_id="42", slurm_restart_count="0")
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over["slurm_restart_count"] == "0"
    lock.release()


def test_a_pid_is_no_proof_across_pid_namespaces_or_after_reuse(tmp_path, sleeper):
    # a container sharing our hostname: its live holder's pid means nothing here, its heartbeat does
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path = write_lock(tmp_path, pid=int(dead), host=socket.gethostname(), pid_namespace="pid:[another]")
    with pytest.raises(RunDirectoryLocked, match=f"in use by process {dead}"):
        RunLock(tmp_path).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    RunLock(tmp_path).acquire().release()  # its heartbeat stopped: taken over
    # our namespace, a live pid started at another time than the holder's: the pid was reused
    write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname(), pid_start_time="1")
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over["pid"] == sleeper.pid
    lock.release()


def _start_together(run_dir: str, barrier, done, results) -> None:
    barrier.wait()
    try:
        RunLock(run_dir).acquire()  # held until the process exits
        results.put("held")
    except RunDirectoryLocked:
        results.put("refused")
    done.wait(30)


def test_of_concurrent_starters_on_a_dead_holders_lock_exactly_one_takes_it(tmp_path, sleeper):
    sleeper.kill()
    sleeper.wait()
    context = multiprocessing.get_context("fork")
    for attempt in range(8):
        run_dir = tmp_path / str(attempt)
        write_lock(run_dir, pid=sleeper.pid, host=socket.gethostname())
        barrier, done, results = context.Barrier(6), context.Event(), context.Queue()
        starters = [context.Process(target=_start_together, args=(str(run_dir), barrier, done, results))
                    for _ in range(6)]
        for p in starters:
            p.start()
        outcomes = sorted(results.get(timeout=30) for _ in starters)
        done.set()
        for p in starters:
            p.join(10)
        assert outcomes == ["held"] + ["refused"] * 5, f"attempt {attempt}: {outcomes}"


# ---- SIGKILL at random points -------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_killed_with_sigkill_at_random_points_resumes_to_the_requested_step(tmp_path):
    run_dir, max_steps = tmp_path / "run", 300
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", "data=digits", "network=tiny",
               "data.batch_size=16", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=50",
               "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
               "callbacks.checkpoint.every_n_train_steps=3", "callbacks.sample_grid.every_n_steps=0",
               "logger=csv", "trainer.max_time=null"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rng = random.Random(0)
    last = run_dir / "checkpoints" / "last.ckpt"
    steps_at_kill = []
    for _ in range(3):
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = last.stat().st_mtime_ns if last.exists() else 0
        deadline = time.time() + 120
        while (not last.exists() or last.stat().st_mtime_ns == before) and process.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)  # wait for this process to write a checkpoint: it is training
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 1.5))  # then kill it anywhere: mid-step, mid-write, mid-validation
        process.send_signal(signal.SIGKILL)
        process.wait()
        steps_at_kill.append(load(last)["global_step"])
    assert steps_at_kill[-1] < max_steps, steps_at_kill  # the kills landed before the end
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    state = load(last)
    assert state["global_step"] == max_steps and int(state["state_dict"]["ema_updates"]) == max_steps
    for path in checkpoints(run_dir):  # every checkpoint file loads
        assert load(path)["global_step"] > 0, path
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not [p.name for p in checkpoints(run_dir) if "-v" in p.name]
    assert not (run_dir / ".lock").exists()
