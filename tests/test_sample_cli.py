"""sample.py: rebuilds the module from a checkpoint and writes PNGs, a grid and the settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from configs import make_cfg, sample_cfg
from difflab.cli.sample import sample
from difflab.cli.train import run
from difflab.loading import load_module


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
    pngs = sorted(out.glob("*_seed*.png"))
    assert pngs[0].name == "0000_seed7.png" and pngs[-1].name == "0004_seed11.png"  # sample i: seed 7 + i
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


def test_sigma_grid_from_the_command_line(checkpoint):
    path, _ = checkpoint
    out = sample(sample_cfg(f"ckpt={path}", "n=2", "sampler=heun", "sampler.sigma_schedule=karras", "steps=3",
                            "progress=false"))
    assert out.name == "heun_karras_3steps_seed0" and len(list(out.glob("*_seed*.png"))) == 2
    assert json.loads((out / "settings.json").read_text())["sampler"]["sigma_schedule"] == "karras"


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
        "label3_000_seed1.png", "label3_001_seed2.png", "label7_000_seed1.png", "label7_001_seed2.png"]
    assert Image.open(out / "grid.png").size == (2 * 10 + 2, 2 * 10 + 2)  # 2 labels x 2 samples
    settings = json.loads((out / "settings.json").read_text())
    assert settings["labels"] == [3, 7] and settings["guidance_scale"] == 3.0
    with pytest.raises(ValueError, match="label=K"):
        sample(sample_cfg(f"ckpt={class_checkpoint}", "prompt=a 7", f"out={tmp_path}", "progress=false"))


def test_prompts_from_the_command_line_and_a_file(text_checkpoint, tmp_path):
    out = sample(sample_cfg(f"ckpt={text_checkpoint}", "prompt=a handwritten 7", "n=2", "guidance_scale=4",
                            "guidance_rescale=0.7", f"out={tmp_path / 'one'}", "progress=false"))
    assert sorted(p.name for p in out.glob("*.png") if p.name != "grid.png") == [
        "a_handwritten_7_000_seed0.png", "a_handwritten_7_001_seed1.png"]
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
    assert len(list(out.glob("label*_seed*.png"))) == 4
    with pytest.raises(ValueError, match="not a noisy classifier"):
        sample(sample_cfg(f"ckpt={path}", f"classifier_ckpt={path}", "label=1", f"out={tmp_path}", "progress=false"))


def test_load_pipeline_equals_sample_cli_and_ignores_batching(class_checkpoint, tmp_path):
    """difflab.load(ckpt)(...) gives sample.py's PNGs for the same settings, and a seed's sample whatever the
    batch size."""
    import difflab

    out = sample(sample_cfg(f"ckpt={class_checkpoint}", "n=8", "label=3", "seed=0", "steps=10", "batch_size=3",
                            f"out={tmp_path}", "progress=false", "device=cpu"))
    pipe = difflab.load(class_checkpoint, device="cpu")
    images = pipe(n=8, label=3, seed=0, steps=10)
    assert images.shape == (8, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    for i, image in enumerate(images):
        png = torch.from_numpy(np.array(Image.open(out / f"label3_{i:03d}_seed{i}.png").convert("L"))).float()
        # save_image rounds x * 255 + 0.5 down
        assert torch.equal(png, (image[0] * 255 + 0.5).clamp(0, 255).floor())
    one_by_one = torch.cat([pipe(n=1, label=3, seed=k, steps=10, batch_size=1) for k in range(8)])
    torch.testing.assert_close(one_by_one, images, atol=1e-5, rtol=0)
    torch.testing.assert_close(pipe(n=8, label=3, seed=0, steps=10, batch_size=8), images, atol=1e-5, rtol=0)
    stochastic = [pipe(n=4, label=3, seed=0, steps=5, sampler="ddpm", batch_size=b) for b in (1, 4)]
    torch.testing.assert_close(stochastic[0], stochastic[1], atol=1e-5, rtol=0)  # per-sample noise during sampling


def test_conditional_model_without_a_condition_samples_its_examples(class_checkpoint, tmp_path):
    """No label: the conditioner's balanced examples (one class per grid row) under the default guidance;
    unconditional=True: the null condition, asked for explicitly."""
    import difflab

    pipe = difflab.load(class_checkpoint, device="cpu")
    examples = pipe(n=20, seed=0, steps=3)
    labels = [k for k in range(10) for _ in range(2)]  # classes in contiguous blocks
    torch.testing.assert_close(examples, pipe(label=labels, seed=list(range(20)), steps=3), atol=1e-6, rtol=0)
    null = pipe(n=4, unconditional=True, seed=0, steps=3)
    torch.testing.assert_close(null, pipe(label=[0, 1, 2, 3], seed=[0, 1, 2, 3], guidance_scale=0.0, steps=3),
                               atol=1e-6, rtol=0)
    assert not torch.allclose(null, examples[:4])
    with pytest.raises(ValueError, match="unconditional=True samples the null condition"):
        pipe(n=1, label=3, unconditional=True)
    out = sample(sample_cfg(f"ckpt={class_checkpoint}", "n=4", "unconditional=true", "steps=3", f"out={tmp_path}",
                            "progress=false", "device=cpu"))
    assert json.loads((out / "settings.json").read_text())["unconditional"] is True
