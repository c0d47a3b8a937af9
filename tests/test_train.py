"""The training app: every config option composes and instantiates; short trainings; exact resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from configs import TINY_AUTOENCODER, TINY_LATENT_NETWORK, make_cfg, options, write_shards
from difflab.loading import load_model, load_module
from difflab.training import build, run

GROUPS = ["data", "network", "schedule", "sampler", "prediction", "loss_weighting", "timestep_sampler", "loss",
          "finetune", "model", "optim", "lr_scheduler", "trainer", "logger", "callbacks", "conditioning",
          "text_encoder", "precision", "ema"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "imagefolder":
        folder = tmp_path / "images" / "cat"
        folder.mkdir(parents=True)
        from PIL import Image

        for i in range(10):
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(folder / f"{i}.png")
        overrides += [f"data.root={tmp_path / 'images'}", "data.batch_size=4", "data.num_workers=0"]  # auto: 3, 1
    if group == "network" and option == "ldm":
        overrides += ["data.image_size=8"]
    if group == "data" and option == "huggingface":  # a dataset written here, as save_to_disk writes one
        datasets = pytest.importorskip("datasets")
        from PIL import Image

        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
        images = [Image.new("RGB", (10, 10), (i * 20, 0, 0)) for i in range(10)]
        datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(10)]},
                                   features=features).save_to_disk(str(tmp_path / "hf"))
        overrides += [f"data.path={tmp_path / 'hf'}", "data.label_column=label", "data.batch_size=4",
                      "data.num_workers=0"]
    if group == "data" and option == "gmm":  # unlabelled
        overrides += ["conditioning=none"]
    if group == "data" and option == "webdataset":
        overrides += [f"data.train_urls={write_shards(tmp_path)}", "data.num_workers=0",
                      "data.image_size=8", "data.batch_size=4", "data.num_classes=2"]
    if group == "data" and option == "dreambooth":  # a subject's images with one prompt: text-conditioned
        from tiny_sd import write_images

        overrides += [f"data.instance_root={write_images(tmp_path / 'subject', 3)}", "data.instance_prompt=a sks cat",
                      "conditioning=text", "data.image_size=16", "data.batch_size=2", "data.num_workers=0"]
    if group == "trainer" and option in ("gpu", "ddp", "multinode", "fsdp"):
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1",
                      "trainer.num_nodes=1"]
    if group == "precision" and option == "16-mixed":  # float16 autocast is GPU-only: check the composed value
        assert make_cfg(tmp_path, *overrides).trainer.precision == "16-mixed"
        return
    if group == "text_encoder":
        overrides.append("conditioning=text")
    if group == "model" and option.startswith("autoencoder"):
        overrides += TINY_AUTOENCODER
    if group == "model" and option == "ldm":
        overrides += [f"first_stage.ckpt={untrained_autoencoder_checkpoint(tmp_path)}", *TINY_LATENT_NETWORK]
    cfg = make_cfg(tmp_path, *overrides)
    if group == "text_encoder" and option == "clip":  # a hub download: check the target, build no model
        from hydra._internal.utils import _locate

        assert callable(_locate(cfg.text_encoder._target_)) and cfg.network.context_dim == cfg.text_encoder.dim
        return
    if group == "network" and option in ("ldm", "base", "latent_small", "dit_b"):  # not pixel MNIST: the node alone
        assert instantiate(cfg.network) is not None
        return
    model, datamodule, trainer = build(cfg)
    batch = next(iter(datamodule.train_dataloader()))
    extra = {"webdataset": {"key"}, "dreambooth": {"loss_weight"}}.get(option, {"index"})
    assert set(batch) == {"image", "label", "caption"} | extra
    if group == "model" and option.startswith("autoencoder"):  # reconstructions of the batch
        assert model(batch["image"]).shape == batch["image"].shape
        assert (model.discriminator is not None) == (option == "autoencoder_gan")
        return
    if group == "model" and option == "classifier":  # the noisy classifier: logits for the batch's labels
        assert model(batch["image"], torch.zeros(len(batch["image"]), dtype=torch.long)).shape == (16, 10)
        return
    assert batch["image"].shape[1:] == model.pipeline().pixel_shape
    # what the option writes into a checkpoint is what the safe loader builds (registry.MODEL_PARTS / DATA)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "saved.ckpt")
    assert load_model(tmp_path / "saved.ckpt").pixel_shape == model.pipeline().pixel_shape


def untrained_autoencoder_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of the tiny model=autoencoder, randomly initialised, as train.py would write it."""
    from omegaconf import OmegaConf

    cfg = make_cfg(tmp_path, "model=autoencoder", *TINY_AUTOENCODER)
    module = instantiate(cfg.model, _convert_="all")
    path = tmp_path / "autoencoder.ckpt"
    torch.save({"state_dict": module.state_dict(), "difflab_config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


def test_unknown_option_lists_valid_choices(tmp_path):
    with pytest.raises(Exception, match="Available options") as info:
        make_cfg(tmp_path, "schedule=cosin")
    for name in ("cosine", "linear", "scaled_linear", "sigmoid"):
        assert name in str(info.value)


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_trains_a_step(tmp_path, preset):
    overrides = [f"experiment={preset}", "trainer.max_steps=1", "callbacks.sample_grid.num_samples=4"]
    if preset == "mnist_autoencoder":
        overrides += TINY_AUTOENCODER
    if preset == "mnist_ldm":
        overrides += [f"first_stage.ckpt={untrained_autoencoder_checkpoint(tmp_path)}", *TINY_LATENT_NETWORK]
    if preset == "latent_dit":  # the digits' latents instead of a Hub VAE on 256-pixel images, on the CPU
        overrides += ["first_stage.pretrained=null", f"first_stage.ckpt={untrained_autoencoder_checkpoint(tmp_path)}",
                      "network=dit_tiny", "network.in_channels=4", "trainer=cpu", "data.image_size=8",
                      "data.num_workers=0"]
    if preset == "ddpm_cifar10_finetune":  # a tiny random UNet2DModel in a folder instead of the Hub's
        import diffusers

        diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2,
                              layers_per_block=1, norm_num_groups=4).save_pretrained(tmp_path / "unet")
        overrides += ["network=diffusers_unet", f"network.pretrained={tmp_path / 'unet'}", "data.channels=1",
                      "data.image_size=8"]
    if preset.startswith("sd15_"):  # a tiny random Stable Diffusion repository instead of the Hub's
        from tiny_sd import tiny_sd_overrides, write_images, write_sd_repo

        overrides += [*tiny_sd_overrides(write_sd_repo(tmp_path / "sd")), "trainer.max_steps=1", "data.batch_size=2"]
        if preset == "sd15_finetune":
            overrides += ["data=imagefolder", f"data.root={write_images(tmp_path / 'images', 4, ['a square'])}"]
        else:
            overrides += ["data=dreambooth", f"data.instance_root={write_images(tmp_path / 'subject', 2)}",
                          "data.instance_prompt=a sks square", "data.class_prompt=a square",
                          f"data.class_root={tmp_path / 'class'}", "data.num_class_images=2"]
    trainer = run(make_cfg(tmp_path, *overrides))
    assert trainer.global_step == 1
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (tmp_path / "samples").is_dir()
    if preset == "mnist_autoencoder":  # the safe loader rebuilds what the preset wrote
        assert load_module(ckpt).autoencoder is not None
    else:
        assert load_model(ckpt).pipeline()(n=1, steps=2, progress=False).shape[0] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("schedule,sampler,prediction", [  # every schedule x prediction, the samplers in turn
    (schedule, options("sampler")[k % len(options("sampler"))], prediction)
    for k, (schedule, prediction) in enumerate(itertools.product(options("schedule"), options("prediction")))])
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


def train_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from the CSV logger's metrics.csv."""
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def test_resume_restores_step_optimizer_and_ema_exactly_and_the_loss_continues(tmp_path):
    quiet = ["callbacks.sample_grid.every_n_steps=1000", "trainer.val_check_interval=30", "optim.lr=3e-3",
             "lr_scheduler=constant"]
    first = run(make_cfg(tmp_path / "a", "trainer.max_steps=30", "callbacks.checkpoint.every_n_train_steps=30", *quiet))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 30 and int(state["state_dict"]["ema_updates"]) == 30
    assert "difflab_config" in state
    module = first.lightning_module
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(state["state_dict"][name], tensor, atol=0, rtol=0, msg=name)
    # EMA differs from the raw weights after training
    assert any(not torch.equal(p, q) for p, q in zip(module.ema.parameters(), module.network.parameters(), strict=True))

    # Restoring alone (max_steps already reached): weights, EMA and optimizer state equal the checkpoint's bit for bit.
    restored = run(make_cfg(tmp_path / "b", "trainer.max_steps=30", f"ckpt_path={ckpt}", *quiet))
    assert restored.global_step == 30
    for name, tensor in restored.lightning_module.state_dict().items():
        torch.testing.assert_close(tensor, state["state_dict"][name], atol=0, rtol=0, msg=name)
    saved_opt = state["optimizer_states"][0]["state"]
    for key, param_state in restored.optimizers[0].state_dict()["state"].items():
        for field, value in param_state.items():
            torch.testing.assert_close(value, saved_opt[key][field], atol=0, rtol=0, msg=f"{key}.{field}")

    # Continuing: the step count, EMA count and AdamW's step go on, and the loss picks up where it was.
    resumed = run(make_cfg(tmp_path / "c", "trainer.max_steps=40", f"ckpt_path={ckpt}", *quiet))
    assert resumed.global_step == 40
    assert int(resumed.lightning_module.ema_updates) == 40
    opt_state = resumed.optimizers[0].state_dict()["state"]
    assert int(next(iter(opt_state.values()))["step"]) == 40
    before, after = train_losses(tmp_path / "a"), train_losses(tmp_path / "c")
    assert min(after) >= 30  # the resumed run logs steps 30.., not 0..
    start = sum(before[s] for s in range(5)) / 5
    end = sum(before[s] for s in range(20, 30)) / 10
    resumed_mean = sum(after.values()) / len(after)
    assert end < 0.8 * start, (start, end)  # meaningful only if training lowered the loss
    # a reset would start again near `start`; continuing stays near `end`
    assert resumed_mean < (start + end) / 2, (start, end, resumed_mean)


def test_resume_from_a_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run(make_cfg(tmp_path, f"ckpt_path={missing}"))


def test_compiled_training_keeps_the_plain_network_in_checkpoints(tmp_path):
    trainer = run(make_cfg(tmp_path, "model.compile={backend: eager}"))  # dynamo path without inductor's C++ build
    module = trainer.lightning_module
    assert isinstance(module.train_network, torch._dynamo.eval_frame.OptimizedModule)
    assert module.train_network._orig_mod is module.network
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(state["state_dict"])
    assert keys == set(module.state_dict()) and not any("_orig_mod" in k for k in keys)
    assert int(state["state_dict"]["ema_updates"]) == 2


def test_progress_bar_describes_open_ended_runs_without_a_negative_epoch_count(tmp_path):
    from difflab.lightning.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = type("T", (), {"max_epochs": -1})()
    assert bar._get_train_description(13).strip() == "Epoch 13"
    bar._trainer = type("T", (), {"max_epochs": 5})()
    assert bar._get_train_description(3).strip() == "Epoch 3/4"
