"""The training app: every config option composes and instantiates; short trainings; exact resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from difflab.cli import CONFIG_DIR
from difflab.cli.train import build, run

GROUPS = ["data", "network", "schedule", "sampler", "prediction", "loss_weighting", "model", "optim",
          "lr_scheduler", "trainer", "logger", "callbacks"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def make_cfg(tmp_path: Path, *overrides: str):
    """The real config, shrunk: 8x8 digits, tiny network, a few steps, few sampler steps."""
    base = [f"paths.output_dir={tmp_path}", "data=digits", "network=tiny", "data.batch_size=16",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_samples=4",
            "callbacks.checkpoint.every_n_train_steps=2", "trainer.limit_val_batches=1"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "imagefolder":
        folder = tmp_path / "images" / "cat"
        folder.mkdir(parents=True)
        from PIL import Image

        for i in range(10):
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(folder / f"{i}.png")
        overrides += [f"data.root={tmp_path / 'images'}", "data.batch_size=4", "network.in_channels=3",
                      "data.num_workers=0"]
    if group == "network" and option == "ldm":
        overrides += ["data.image_size=8"]
    if group == "trainer" and option in ("gpu", "ddp"):
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1"]
    cfg = make_cfg(tmp_path, *overrides)
    if group == "network" and option in ("ldm", "base"):  # no matching dataset yet: instantiate the node alone
        assert instantiate(cfg.network) is not None
        return
    model, datamodule, trainer = build(cfg)
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"image", "label", "caption"}
    assert batch["image"].shape[1:] == model.image_shape


def test_unknown_option_lists_valid_choices(tmp_path):
    with pytest.raises(Exception, match="Available options") as info:
        make_cfg(tmp_path, "schedule=cosin")
    for name in ("cosine", "linear", "scaled_linear", "sigmoid"):
        assert name in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,sampler,prediction", list(itertools.product(
    options("schedule"), options("sampler"), options("prediction"))))
def test_two_step_training(tmp_path, schedule, sampler, prediction):
    cfg = make_cfg(tmp_path, f"schedule={schedule}", f"sampler={sampler}", f"prediction={prediction}",
                   "sampler.num_steps=3", "logger=csv")
    trainer = run(cfg)
    assert trainer.global_step == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "samples" / "step_000002.png").exists()
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics and "train/grad_norm" in metrics
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_resume_restores_step_optimizer_and_ema_exactly(tmp_path):
    first = run(make_cfg(tmp_path / "a", "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=4"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and int(state["state_dict"]["ema_updates"]) == 4
    assert "difflab_config" in state
    module = first.lightning_module
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(state["state_dict"][name], tensor, atol=0, rtol=0, msg=name)
    # EMA differs from the raw weights after training
    assert any(not torch.equal(p, q) for p, q in zip(module.ema.parameters(), module.network.parameters(), strict=True))

    resumed = run(make_cfg(tmp_path / "a", "trainer.max_steps=6", f"ckpt_path={ckpt}"))
    assert resumed.global_step == 6
    assert int(resumed.lightning_module.ema_updates) == 6
    # the optimizer state continued: AdamW's step count is 6, not 2
    opt_state = resumed.optimizers[0].state_dict()["state"]
    assert int(next(iter(opt_state.values()))["step"]) == 6


def test_resume_from_a_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run(make_cfg(tmp_path, f"ckpt_path={missing}"))
