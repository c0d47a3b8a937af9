"""sample.py: rebuilds the module from a checkpoint and writes PNGs, a grid and the settings."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from difflab.cli import CONFIG_DIR
from difflab.cli.sample import load_module, sample
from difflab.cli.train import run
from test_train import make_cfg


def sample_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("sample", overrides=list(overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    trainer = run(make_cfg(tmp, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3",
                           "sampler.num_steps=4"))
    return tmp / "checkpoints" / "last.ckpt", trainer.lightning_module


def test_load_module_restores_the_trained_weights(checkpoint):
    path, trained = checkpoint
    module = load_module(path)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert module.sampler.num_steps == 4 and module.image_shape == trained.image_shape


def test_sample_writes_pngs_grid_and_settings(checkpoint, tmp_path):
    path, _ = checkpoint
    out = sample(sample_cfg(f"ckpt={path}", "n=5", "batch_size=2", "sampler=dpmpp_2m", "steps=3", "seed=7",
                            f"out={tmp_path / 'gen'}", "progress=false"))
    pngs = sorted(out.glob("*_seed7.png"))
    assert len(pngs) == 5
    assert Image.open(pngs[0]).size == (8, 8)
    assert Image.open(out / "grid.png").size == (3 * 10 + 2, 2 * 10 + 2)  # 3 columns x 2 rows of 8 px + padding
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampler"]["_target_"].endswith("DPMSolverPlusPlus2MSampler")
    assert settings["sampler"]["num_steps"] == 3
    # same seed, same samples
    again = sample(sample_cfg(f"ckpt={path}", "n=5", "batch_size=2", "sampler=dpmpp_2m", "steps=3", "seed=7",
                              f"out={tmp_path / 'gen2'}", "progress=false"))
    assert (out / "grid.png").read_bytes() == (again / "grid.png").read_bytes()


def test_default_sampler_is_the_trained_one(checkpoint, tmp_path):
    path, _ = checkpoint
    out = sample(sample_cfg(f"ckpt={path}", "n=2", f"out={tmp_path}", "progress=false"))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampler"]["_target_"].endswith("DDIMSampler") and settings["sampler"]["num_steps"] == 4


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        sample(sample_cfg(f"ckpt={missing}"))
