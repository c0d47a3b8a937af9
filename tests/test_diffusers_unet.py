"""network=diffusers_unet: tiny random diffusers UNets written with save_pretrained train through difflab, sample
with sample.py, reload without their folder; added conditioning starts at zero; mismatches name the fix."""

from __future__ import annotations

import shutil

import pytest
import torch

from configs import make_cfg, sample_cfg
from difflab.cli.sample import sample
from difflab.cli.train import run
from difflab.errors import UsageError
from difflab.loading import load_module
from network_contract import check_null_class, check_padded_context_is_ignored, randomize

diffusers = pytest.importorskip("diffusers")
from difflab.nn.diffusers_unet import DiffusersUNet, diffusers_unet  # noqa: E402

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=4, norm_num_groups=4)
TINY_CONDITION_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                           norm_num_groups=4, cross_attention_dim=384)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    randomize(diffusers.UNet2DModel(**TINY_UNET)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def condition_unet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("condition_unet")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**TINY_CONDITION_UNET).save_pretrained(path)
    return path


def test_a_pretrained_unet2d_trains_samples_and_reloads_without_its_folder(unet_dir, tmp_path):
    folder = tmp_path / "published"
    shutil.copytree(unet_dir, folder)
    trainer = run(make_cfg(tmp_path, "network=diffusers_unet", f"network.pretrained={folder}", "conditioning=none",
                           "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3", "sampler.num_steps=3"))
    module = trainer.lightning_module
    assert isinstance(module.network, DiffusersUNet) and module.network.kind == "unet2d"
    published = diffusers.UNet2DModel.from_pretrained(folder)
    changed = [name for name, p in module.network.model.named_parameters()
               if not torch.equal(p, published.state_dict()[name])]
    assert changed  # training moved the published weights
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    shutil.rmtree(folder)  # the checkpoint carries the architecture: no folder or Hub needed to sample
    reloaded = load_module(ckpt)
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    out = sample(sample_cfg(f"ckpt={ckpt}", "n=3", "steps=2", f"out={tmp_path / 'gen'}", "progress=false"))
    assert len(sorted(out.glob("*_seed*.png"))) == 3


def test_class_conditioning_added_to_a_pretrained_model_starts_as_published(unet_dir):
    published = diffusers.UNet2DModel.from_pretrained(unet_dir).eval()
    network = diffusers_unet(pretrained=str(unet_dir), num_classes=10).eval()
    assert network.model.class_embedding.num_embeddings == 11
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 200, 600, 999])
    with torch.no_grad():
        expected = published(x, t).sample
        torch.testing.assert_close(network(x, t, class_labels=torch.tensor([0, 3, 9, 10])), expected)
    check_null_class(randomize(network), size=8)  # and once trained, every class is its own


def test_a_pretrained_unet2d_condition_model_trains_with_text(condition_unet_dir, tmp_path):
    trainer = run(make_cfg(tmp_path, "network=diffusers_unet", f"network.pretrained={condition_unet_dir}",
                           "conditioning=text", "trainer.max_steps=2"))
    network = trainer.lightning_module.network
    assert network.kind == "unet2d_condition" and network.context_dim == 384 and network.cond_dim == 384
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_text_through_the_wrapper_ignores_padding_tokens():
    network = randomize(diffusers_unet(in_channels=4, context_dim=12, config=dict(
        block_out_channels=[8, 16], norm_num_groups=4, attention_head_dim=2,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])))
    check_padded_context_is_ignored(network.eval())


def test_built_from_config_for_every_conditioning(tmp_path):
    for conditioning in ("none", "class"):
        trainer = run(make_cfg(tmp_path / conditioning, "network=diffusers_unet", f"conditioning={conditioning}",
                               "trainer.max_steps=1"))
        assert trainer.global_step == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=3), "takes 1 channels, the data has 3"),
    (dict(context_dim=12), "needs cross-attention"),
    (dict(config={"layers_per_block": 2}), "leave it empty"),
])
def test_mismatches_name_the_fix(unet_dir, kwargs, message):
    with pytest.raises(UsageError, match=message):
        diffusers_unet(pretrained=str(unet_dir), **kwargs)


def test_text_width_mismatch_names_the_encoder(condition_unet_dir):
    with pytest.raises(UsageError, match="attends to 384-d text states, text_encoder gives 512-d"):
        diffusers_unet(pretrained=str(condition_unet_dir), context_dim=512)


def test_the_cifar10_preset_names_the_published_model_and_its_objective():
    from configs import compose_config

    cfg = compose_config("train", "experiment=ddpm_cifar10_finetune", "data.root=/nonexistent")
    assert cfg.network.pretrained == "google/ddpm-cifar10-32" and cfg.network.num_classes is None
    assert (cfg.data.channels, cfg.data.image_size) == (3, 32)
    assert cfg.schedule._target_.endswith("linear") and cfg.prediction._target_.endswith("EpsilonPrediction")
