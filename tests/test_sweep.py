"""Sweeps: Hydra's submitit launchers, one run dir per point, the summary table; the hand-off of a preemption
signal to submitit after the checkpoint is written."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from configs import make_cfg
from difflab.cli import CONFIG_DIR
from difflab.cli.sweep_summary import main as summary_main
from difflab.cli.sweep_summary import summarize, write_final_metrics
from difflab.cli.train import run, stopped_by_signal

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data=digits", "network=tiny", "data.batch_size=16", "trainer.max_steps=3", "trainer.max_time=null",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=3",
        "sampler.num_steps=2"]


def test_submitit_local_sweep_writes_every_run_dir_and_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("DIFFLAB_RUN_DIR", None)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local",
                             f"hydra.sweep.dir={sweep}", "schedule=linear,cosine", *TINY],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for num, schedule in ((0, "linear"), (1, "cosine")):
        run_dir = sweep / str(num)
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert f"schedule={schedule}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        final = json.loads((run_dir / "metrics.json").read_text())
        assert final["global_step"] == 3 and f"schedule={schedule}" in final["overrides"]
        with open(run_dir / "csv" / "metrics.csv") as f:  # the summary's value is the logger's last one
            logged = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
        assert final["metrics"]["val/loss"] == pytest.approx(logged[-1], rel=1e-6)
    assert (sweep / ".submitit").is_dir()  # it really went through submitit
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["schedule"], r["status"]) for r in rows] == [("0", "linear", "done"), ("1", "cosine", "done")]
    assert "data" not in rows[0]  # an override shared by every point is not a column
    assert float(rows[0]["val/loss"]) != float(rows[1]["val/loss"])
    assert "| run | schedule | step | val/loss" in (sweep / "summary.md").read_text()


def test_summary_columns_are_the_swept_keys_and_unfinished_runs_are_listed(tmp_path, capsys):
    for num, (lr, schedule, loss) in enumerate([(1e-3, "linear", 0.5), (1e-4, "linear", 0.25)]):
        (tmp_path / str(num)).mkdir()
        write_final_metrics(tmp_path / str(num), {"val/loss": torch.tensor(loss), "train/loss": float("nan")}, 10,
                            [f"optim.lr={lr}", f"schedule={schedule}"])
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # started, never finished
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- optim.lr=1e-5\n- schedule=linear\n")
    (tmp_path / ".submitit").mkdir()
    columns, rows = summarize(tmp_path)
    assert columns == ["run", "optim.lr", "step", "val/loss", "train/loss", "status"]
    assert [r["optim.lr"] for r in rows] == ["0.001", "0.0001", "1e-5"]
    assert [r["val/loss"] for r in rows] == [0.5, 0.25, ""] and rows[0]["train/loss"] == "nan"
    assert [r["status"] for r in rows] == ["done", "done", "unfinished"]
    summary_main([str(tmp_path)])
    assert "| 1 | 0.0001 | 10 | 0.25 | nan | done |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no runs in"):
        summarize(tmp_path / ".submitit")
    with pytest.raises(SystemExit, match="sweep directory not found: .*nowhere"):
        summary_main([str(tmp_path / "nowhere")])


def test_summary_md_shows_figures_with_their_intervals(tmp_path):
    """A FID logged with its bounds (val/fid_500, _low, _high) reads "figure [low, high]" in summary.md; summary.csv
    keeps the three columns."""
    for num, (schedule, fid) in enumerate([("linear", 2.0), ("cosine", 1.5)]):
        (tmp_path / str(num)).mkdir()
        write_final_metrics(tmp_path / str(num), {"val/fid_500": fid, "val/fid_500_low": fid - 0.25,
                                                  "val/fid_500_high": fid + 0.5, "val/loss": 0.1}, 10,
                            [f"schedule={schedule}"])
    columns, _ = summarize(tmp_path)
    assert {"val/fid_500", "val/fid_500_low", "val/fid_500_high"} <= set(columns)
    table = (tmp_path / "summary.md").read_text()
    assert table.splitlines()[0] == "| run | schedule | step | val/fid_500 | val/loss | status |"
    assert "| 1 | cosine | 10 | 1.5 [1.25, 2] | 0.1 | done |" in table


def test_an_ablation_gets_a_loss_by_t_plot_relative_to_its_median(tmp_path):
    """Three runs whose losses are 1x, 2x and 4x a common curve: panel (b) shows 0.5, 1 and 2 in every bucket."""
    points = [("sinusoidal", "add", 1.0), ("learned", "add", 2.0), ("sinusoidal", "film", 4.0)]
    for num, (embedding, injection, factor) in enumerate(points):
        run_dir = tmp_path / str(num)
        (run_dir / "csv").mkdir(parents=True)
        with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *[f"train/loss_t{k}" for k in range(4)]])
            for step in range(10, 210, 10):  # the end of training (last 10 logs) sits at the curve
                scale = factor * (1 if step > 100 else 3)
                writer.writerow([step, *[scale * 10.0 ** -k for k in range(4)]])
        write_final_metrics(run_dir, {f"train/loss_t{k}": factor * 10.0 ** -k for k in range(4)}, 200,
                            [f"network.time_embedding={embedding}", f"network.time_injection={injection}"])
    summarize(tmp_path)
    assert (tmp_path / "loss_by_t.png").read_bytes()[:4] == b"\x89PNG"

    from difflab.plots import sweep_loss_by_t_figure

    figure = sweep_loss_by_t_figure([tmp_path / str(i) for i in range(3)], ["a", "b", "c"], colors=[0, 0, 1],
                                    linestyles=[0, 1, 0])
    absolute, relative = figure.axes[:2]
    for line, (_, _, factor) in zip(absolute.lines, points, strict=True):
        assert line.get_xdata().tolist() == [0.125, 0.375, 0.625, 0.875]
        assert line.get_ydata() == pytest.approx([factor * 10.0 ** -k for k in range(4)])
    ratios = [line.get_ydata() for line in relative.lines if line.get_label() in "abc"]
    assert [list(r) for r in ratios] == [pytest.approx([f / 2.0] * 4) for f in (1.0, 2.0, 4.0)]
    assert [line.get_color() for line in absolute.lines] == ["C0", "C0", "C1"]
    assert [line.get_linestyle() for line in absolute.lines] == ["-", "--", "-"]


def test_the_ablation_preset_sweeps_every_embedding_and_injection():
    from difflab.nn import TIME_EMBEDDINGS, TIME_INJECTIONS

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ablate_time"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params["network.time_embedding"].split(",")) == set(TIME_EMBEDDINGS)
    assert set(params["network.time_injection"].split(",")) == set(TIME_INJECTIONS)
    assert cfg.trainer.max_steps == 600 and cfg.trainer.max_time is None


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launcher_configs_compose_and_instantiate_sized_from_the_trainer(launcher):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "trainer=multinode", "trainer.num_nodes=3",
                                          "trainer.devices=4"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher_cfg = cfg.hydra.launcher
    if launcher == "slurm":
        assert (launcher_cfg.nodes, launcher_cfg.tasks_per_node, launcher_cfg.gpus_per_node) == (3, 4, 4)
    assert type(instantiate(launcher_cfg)).__name__ == {"local": "LocalLauncher",
                                                        "slurm": "SlurmLauncher"}[launcher]
    assert cfg.hydra.callbacks.sweep_summary._target_ == "difflab.cli.sweep_summary.SweepSummary"


class RaiseAt(L.Callback):
    """Raises ``signum`` at the end of step ``step``, then (``busy_s``) keeps the step from ending for a while, as
    a long validation or FID evaluation would."""

    def __init__(self, step: int, signum: int, busy_s: float = 0.0):
        self.step, self.signum, self.busy_s = step, signum, busy_s

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)
            time.sleep(self.busy_s)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")
def test_submitit_preemption_signal_is_handed_on_after_the_checkpoint(tmp_path, monkeypatch):
    """Under submitit, the preemption signal (USR2) stops training at a step boundary, last.ckpt is written, and
    only then submitit's handler (which resubmits and exits) is called; a preempted run writes no final metrics."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    last = tmp_path / "checkpoints" / "last.ckpt"
    calls = []

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        calls.append((signum, last.is_file() and torch.load(last, weights_only=False)["global_step"]))

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        cfg = make_cfg(tmp_path, "trainer.max_steps=50", "trainer.val_check_interval=100",
                       "callbacks.checkpoint.every_n_train_steps=100", "callbacks.sample_grid.every_n_steps=0",
                       "+callbacks.raise_at._target_=test_sweep.RaiseAt", "+callbacks.raise_at.step=4",
                       f"+callbacks.raise_at.signum={int(signal.SIGUSR2)}")
        trainer = run(cfg)
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # put back after training
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert trainer.global_step in (4, 5)  # the step it arrived in (or the next: callbacks run in order), not 50
    assert calls == [(signal.SIGUSR2, trainer.global_step)]  # once, with the last step's checkpoint on disk
    assert not (tmp_path / "metrics.json").exists()


def test_slurm_launcher_submits_one_array_sized_from_the_trainer(tmp_path):
    """hydra/launcher=slurm up to the sbatch call (a fake sbatch keeps the script and refuses): nodes, tasks and
    GPUs per node from the trainer config, submitit's preemption signal, one array task per sweep point."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "sbatch: no cluster" >&2\n'
                                    "exit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that it exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer=multinode", "trainer.num_nodes=2",
                             "trainer.devices=4", "hydra.launcher.partition=gpu", "schedule=linear,cosine"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "sbatch: no cluster" in result.stderr + result.stdout
    script = (tmp_path / "submitted.sh").read_text()
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240",
                 "--signal=USR2@120", "--array=0-1%2", "--cpus-per-task=8", "--requeue"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "srun" in script and "SUBMITIT_EXECUTOR=slurm" in script


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")
def test_submitit_gets_the_signal_in_time_when_the_step_does_not_end(tmp_path, monkeypatch):
    """A step kept busy past handoff_timeout_s (validation, FID): submitit's handler is called at once (requeue from
    the last periodic checkpoint) and only once, though training then stops and writes last.ckpt as usual."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    last = tmp_path / "checkpoints" / "last.ckpt"
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(last.is_file()))
    try:
        trainer = run(make_cfg(tmp_path, "trainer.max_steps=50", "trainer.val_check_interval=100",
                               "callbacks.checkpoint.every_n_train_steps=100", "callbacks.sample_grid.every_n_steps=0",
                               "+callbacks.last_checkpoint.handoff_timeout_s=0.2",
                               "+callbacks.raise_at._target_=test_sweep.RaiseAt", "+callbacks.raise_at.step=3",
                               f"+callbacks.raise_at.signum={int(signal.SIGUSR2)}", "+callbacks.raise_at.busy_s=1.0"))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [False]  # during the busy step, before any checkpoint; not again after fit
    assert trainer.global_step < 50 and last.is_file()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_stopped_run_puts_back_the_handlers_it_found_and_leaves_no_final_metrics(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    (tmp_path / "metrics.json").write_text("{}")  # from an earlier run in this directory
    trainer = run(make_cfg(tmp_path, "trainer.max_steps=50", "trainer.val_check_interval=100",
                           "callbacks.checkpoint.every_n_train_steps=100", "callbacks.sample_grid.every_n_steps=0",
                           "+callbacks.raise_at._target_=test_sweep.RaiseAt", "+callbacks.raise_at.step=2",
                           f"+callbacks.raise_at.signum={int(signal.SIGTERM)}"))
    assert trainer.global_step < 50 and stopped_by_signal(trainer) is not None
    assert {s: signal.getsignal(s) for s in before} == before  # not Lightning's, not ours
    assert not (tmp_path / "metrics.json").exists()


def test_resuming_a_run_with_another_config_says_what_changed(tmp_path):
    run(make_cfg(tmp_path, "trainer.max_steps=2"))
    # the resolved configs are compared: what reads trainer.max_steps (the budget LR schedule) is listed too
    with pytest.warns(UserWarning, match=r"config differs from this one: (\S+: 2 -> 4, )*trainer.max_steps: 2 -> 4"):
        trainer = run(make_cfg(tmp_path, "trainer.max_steps=4"))  # ckpt_path=auto: continues
    assert trainer.global_step == 4
