"""The wheel, installed as a user would: its entry points train and sample from a folder outside the checkout,
with the configs shipped in the package, and a user's config folder added with ``hydra.searchpath``.

Offline: the wheel is built without build isolation and installed with --no-deps --no-index into a fresh venv
that sees this environment's packages (torch, lightning, ...) but not its editable difflab."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(args: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def _clean_env() -> dict:
    """This environment without anything that would put the checkout on sys.path or reach the network."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DIFFLAB_RUN_DIR", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A venv with the wheel of this checkout installed (not editable): its bin dir, site-packages and env."""
    root = tmp_path_factory.mktemp("packaging")
    env = _clean_env()
    # Build from a copy of what the wheel is made of, so that no build/ or *.egg-info lands in the checkout.
    source = root / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", root / "dist", source], cwd=root, env=env)
    (wheel,) = (root / "dist").glob("difflab-*.whl")

    prefix = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=os.name != "nt").create(prefix)
    python = prefix / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--force-reinstall", "-q", wheel], cwd=root, env=env)
    venv_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=root, env=env).stdout.strip())
    # This environment's packages (torch, lightning, ...), after the venv's own: plain path lines, so the .pth
    # files there (this checkout's editable install among them) are not run and the wheel's difflab wins.
    parents = [p for p in site.getsitepackages() if Path(p).resolve() != venv_site.resolve()]
    (venv_site / "_difflab_test_parent_env.pth").write_text("".join(f"{p}\n" for p in parents))
    return {"bin": python.parent, "python": python, "site": venv_site, "env": env, "root": root}


def test_the_venv_imports_the_installed_wheel_not_the_checkout(installed):
    out = _run([installed["python"], "-c", "import difflab, difflab.conf, sys; print(difflab.__file__); "
                "print(difflab.conf.CONFIG_DIR); print(*sys.path, sep='\\n')"],
               cwd=installed["root"], env=installed["env"]).stdout.splitlines()
    module, config_dir, path = Path(out[0]), Path(out[1]), out[2:]
    assert module.is_relative_to(installed["site"]), module
    assert config_dir == installed["site"] / "difflab" / "conf"
    assert (config_dir / "train.yaml").is_file() and (config_dir / "network" / "tiny.yaml").is_file()
    assert not any(Path(p).resolve() == (REPO / "src").resolve() for p in path if p), path


def test_entry_points_train_and_sample_with_a_user_config_folder(installed, tmp_path):
    """difflab-train from a folder that is not the checkout, with network=mine from hydra.searchpath (the
    packaged tiny network with another width), then difflab-sample from its checkpoint."""
    text = (installed["site"] / "difflab" / "conf" / "network" / "tiny.yaml").read_text()
    tiny = yaml.safe_load(text)
    mine, changed = re.subn(r"^model_channels: 16\b", "model_channels: 8", text, flags=re.MULTILINE)
    assert changed == 1, text
    user = tmp_path / "my_conf"
    (user / "network").mkdir(parents=True)
    (user / "network" / "mine.yaml").write_text(mine)
    work, run_dir, samples = tmp_path / "work", tmp_path / "run", tmp_path / "samples"
    work.mkdir()
    bin_dir, env = installed["bin"], installed["env"]

    _run([bin_dir / "difflab-train", f"hydra.searchpath=[file://{user}]", "network=mine", "data=digits",
          "data.batch_size=16", "trainer.max_time=null", "trainer.max_steps=3", "trainer.val_check_interval=3",
          "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
          "~callbacks.progress_bar", "callbacks.sample_grid.every_n_steps=3", "callbacks.sample_grid.num_samples=4",
          "callbacks.checkpoint.every_n_train_steps=3", "sampler.num_steps=2", f"hydra.run.dir={run_dir}"],
         cwd=work, env=env)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    composed = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert composed["network"]["model_channels"] == 8  # the user's option, not the packaged tiny's 16
    assert {k: v for k, v in composed["network"].items() if k not in ("model_channels", "in_channels",
                                                                     "num_classes")} == \
        {k: v for k, v in tiny.items() if k not in ("model_channels", "in_channels", "num_classes")}

    _run([bin_dir / "difflab-sample", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "n=2", "steps=2",
          f"out={samples}", "device=cpu", "progress=false"], cwd=work, env=env)
    assert (samples / "grid.png").is_file()
    assert len([p for p in samples.glob("*.png") if p.name != "grid.png"]) == 2
    assert not list(work.iterdir()), "nothing is written to the working directory"
