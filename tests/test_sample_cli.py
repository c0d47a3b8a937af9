"""sample.py: rebuilds the module from a checkpoint and writes PNGs, a grid and the settings."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from difflab.cli.sample import load_module, sample
from difflab.cli.train import run
from test_train import compose_config, make_cfg


def sample_cfg(*overrides: str):
    return compose_config("sample", *overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    trainer = run(make_cfg(tmp, "conditioning=none", "trainer.max_steps=3",
                           "callbacks.checkpoint.every_n_train_steps=3", "sampler.num_steps=4"))
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


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("class_run")
    run(make_cfg(tmp, "conditioning=class", "trainer.max_steps=2", "sampler.num_steps=3"))
    return tmp / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_run")
    run(make_cfg(tmp, "conditioning=text", "trainer.max_steps=2", "sampler.num_steps=3"))
    return tmp / "checkpoints" / "last.ckpt"


def test_labels_write_one_row_per_label(class_checkpoint, tmp_path):
    out = sample(sample_cfg(f"ckpt={class_checkpoint}", "label=[3,7]", "n=2", "guidance_scale=3", "seed=1",
                            f"out={tmp_path}", "progress=false"))
    assert sorted(p.name for p in out.glob("label*.png")) == [
        "label3_000_seed1.png", "label3_001_seed1.png", "label7_000_seed1.png", "label7_001_seed1.png"]
    assert Image.open(out / "grid.png").size == (2 * 10 + 2, 2 * 10 + 2)  # 2 labels x 2 samples
    settings = json.loads((out / "settings.json").read_text())
    assert settings["labels"] == [3, 7] and settings["guidance_scale"] == 3.0
    with pytest.raises(ValueError, match="label=K"):
        sample(sample_cfg(f"ckpt={class_checkpoint}", "prompt=a 7", f"out={tmp_path}", "progress=false"))


def test_prompts_from_the_command_line_and_a_file(text_checkpoint, tmp_path):
    out = sample(sample_cfg(f"ckpt={text_checkpoint}", "prompt=a handwritten 7", "n=2", "guidance_scale=4",
                            "guidance_rescale=0.7", f"out={tmp_path / 'one'}", "progress=false"))
    assert sorted(p.name for p in out.glob("*.png") if p.name != "grid.png") == [
        "a_handwritten_7_000_seed0.png", "a_handwritten_7_001_seed0.png"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 1\n\nthe digit two\n")
    out = sample(sample_cfg(f"ckpt={text_checkpoint}", f"prompts_file={prompts}", "n=1",
                            f"out={tmp_path / 'file'}", "progress=false"))
    assert json.loads((out / "settings.json").read_text())["prompts"] == ["a handwritten 1", "the digit two"]
    assert (out / "the_digit_two_000_seed0.png").exists()
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        sample(sample_cfg(f"ckpt={text_checkpoint}", f"prompts_file={tmp_path / 'nope.txt'}", "progress=false"))


def test_unconditional_model_refuses_prompts(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ValueError, match="unconditional model"):
        sample(sample_cfg(f"ckpt={path}", "label=3", f"out={tmp_path}", "progress=false"))


def test_classifier_guidance_from_a_trained_noisy_classifier(checkpoint, tmp_path):
    path, _ = checkpoint
    run(make_cfg(tmp_path / "clf", "model=classifier", "trainer.max_steps=2"))
    classifier = tmp_path / "clf" / "checkpoints" / "last.ckpt"
    out = sample(sample_cfg(f"ckpt={path}", f"classifier_ckpt={classifier}", "classifier_scale=2", "label=[1,4]",
                            "n=2", "steps=3", f"out={tmp_path / 'gen'}", "progress=false"))
    assert len(list(out.glob("label*_seed0.png"))) == 4
    with pytest.raises(ValueError, match="not a noisy classifier"):
        sample(sample_cfg(f"ckpt={path}", f"classifier_ckpt={path}", "label=1", f"out={tmp_path}", "progress=false"))
