"""A mistake on the command line (a missing mandatory value, an unknown key or option, a bad argument) is one line on
stderr naming the value and the fix, exit status 2, no traceback and no run directory left behind; the real
entry points, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from configs import make_cfg
from difflab.cli.errors import remove_if_scaffolding
from difflab.cli.train import run

ROOT = Path(__file__).resolve().parents[1]


def cli(tmp_path: Path, *args: str, full_error: bool = False) -> subprocess.CompletedProcess:
    """``python <args>`` from ``tmp_path`` (sample.py and evaluate.py write to the working directory)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("override,expected", [
    ("data=imagefolder", ("data.root is required for data=imagefolder", "data.root=")),
    ("trainer.max_step=10", ("trainer.max_step", "did you mean trainer.max_steps?")),
    ("sampler=nope", ("sampler=nope is not an option", "ddim, ddpm, dpmpp_2m")),
])
def test_train_command_line_mistakes_are_one_line_and_leave_no_run_dir(tmp_path, override, expected):
    result = cli(tmp_path, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", override)
    assert_one_line(result, *expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,expected", [
    (["model=ldm", "first_stage.ckpt=a.ckpt", "first_stage.pretrained=b"],
     ("model=ldm needs exactly one first stage", "both were given")),
    (["model=ldm", "first_stage_training.budget=1.5"], ("first_stage_training.budget=1.5", "between 0 and 1")),
    (["model=ldm", "first_stage.ckpt=/nowhere/ae.ckpt"], ("first-stage checkpoint not found: /nowhere/ae.ckpt",)),
    (["conditioning=text", "text_encoder=clip", "text_encoder.name_or_path=/nowhere/clip",
      "text_encoder.local_files_only=true"], ("could not load the text encoder '/nowhere/clip'",)),
    (["data=imagefolder", "data.root=EMPTY"], ("no images found in",)),
])
def test_errors_raised_while_the_config_is_instantiated_are_one_line(tmp_path, overrides, expected):
    """A constructor's refusal (raised inside Hydra's instantiate) reaches the user as difflab's one line."""
    (tmp_path / "empty").mkdir()
    overrides = [o.replace("EMPTY", str(tmp_path / "empty")) for o in overrides]
    result = cli(tmp_path, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert_one_line(result, *expected)
    assert not (tmp_path / "run").exists()


def test_full_error_shows_the_traceback(tmp_path):
    result = cli(tmp_path, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "data=imagefolder",
                 full_error=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "data.root" in result.stderr


@pytest.mark.parametrize("entry", ["sample.py", "-m difflab.cli.nfe_sweep"])
def test_missing_checkpoint_argument(tmp_path, entry):
    script = [str(ROOT / entry)] if entry.endswith(".py") else entry.split()
    assert_one_line(cli(tmp_path, *script), "ckpt is required", "ckpt=PATH")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_without_a_checkpoint_or_samples(tmp_path):
    assert_one_line(cli(tmp_path, str(ROOT / "evaluate.py")), "ckpt=PATH", "samples=DIR")


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    run(make_cfg(tmp, "conditioning=class", "trainer.max_steps=2", "sampler.num_steps=2"))
    Image.new("L", (8, 8), 128).save(tmp / "input.png")
    return tmp / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("arguments,expected", [
    (["label=12"], ("label=12 is out of range", "0..9")),
    (["steps=0"], ("num_steps must be in [1, ", "got 0")),
    (["init_image=INPUT", "strength=1.7"], ("strength must be in [0, 1]", "got 1.7")),
])
def test_sample_refusals_are_one_line(class_checkpoint, tmp_path, arguments, expected):
    arguments = [a.replace("INPUT", str(class_checkpoint.parent.parent / "input.png")) for a in arguments]
    result = cli(tmp_path, str(ROOT / "sample.py"), f"ckpt={class_checkpoint}", "n=2", "progress=false",
                 f"out={tmp_path / 'out'}", *arguments)
    assert_one_line(result, *expected)


def test_only_a_run_dir_of_scaffolding_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.time()
    date = tmp_path / "outputs" / "2024-01-01"
    for name in ("a", "b", "c"):
        (date / name / ".hydra").mkdir(parents=True)
        (date / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (date / name / "train.log").write_text("")
    (date / "b" / "checkpoints").mkdir()  # a run's work: kept
    os.utime(date / "c" / "train.log", (started - 3600, started - 3600))  # an earlier process's: kept
    assert not remove_if_scaffolding(date / "b", since=started)
    assert not remove_if_scaffolding(date / "c", since=started)
    assert remove_if_scaffolding(date / "a", since=started) and date.is_dir()
    assert not remove_if_scaffolding(tmp_path, since=0.0)  # never the working directory
    for name in ("b", "c"):
        (date / name).rename(tmp_path / name)
    (date / "d" / ".hydra").mkdir(parents=True)
    assert remove_if_scaffolding(date / "d", since=started) and not date.exists()  # and its emptied date folder
