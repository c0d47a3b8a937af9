"""The autoencoder first stage, its Lightning module, diffusers' AutoencoderKL as a first stage, and latent
diffusion trained, saved, reloaded and edited end to end."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from configs import TINY_AUTOENCODER, TINY_LATENT_NETWORK, make_cfg, sample_cfg
from difflab.cli.sample import sample
from difflab.cli.train import run
from difflab.latent import AutoencoderFirstStage, DiffusersFirstStage, load_first_stage
from difflab.lightning import AutoencoderModule, LatentDiffusionModule
from difflab.loading import load_module
from difflab.nn import Autoencoder, DiagonalGaussian, PatchDiscriminator


@pytest.mark.parametrize("channel_mult,f", [((1, 2), 2), ((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
def test_autoencoder_shapes(channel_mult, f):
    model = Autoencoder(in_channels=3, channels=8, channel_mult=channel_mult, latent_channels=4, norm_groups=4)
    x = torch.randn(2, 3, 32, 32)
    x_hat, posterior = model(x)
    assert model.downsampling_factor == f
    assert posterior.mean.shape == (2, 4, 32 // f, 32 // f) and x_hat.shape == x.shape
    with pytest.raises(ValueError, match="not divisible by the downsampling factor"):
        model.encode(torch.randn(1, 3, 2 * f + 1, 2 * f + 1))


def test_posterior_kl_matches_torch_distributions():
    moments = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    posterior = DiagonalGaussian(moments)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.std))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected)
    n = 2000
    samples = DiagonalGaussian(moments.repeat(n, 1, 1, 1)).sample(torch.Generator().manual_seed(0))
    samples = samples.reshape(n, 3, 4, 4, 4)
    # within 5 standard errors, element by element: the sample mean's is std / sqrt(n), the sample std's about
    # std / sqrt(2n); pooled over the 192 elements, the variance ratio's is sqrt(2 / (192 n)) (a sampler off by a
    # tenth of a std in location, or by 3 % in scale, fails)
    assert ((samples.mean(0) - posterior.mean).abs() <= 5 * posterior.std / n**0.5).all()
    assert ((samples.std(0) - posterior.std).abs() <= 5 * posterior.std / (2 * n) ** 0.5).all()
    ratio = (samples.var(0) / posterior.std**2).mean()
    assert abs(ratio - 1) <= 5 * (2 / (samples[0].numel() * n)) ** 0.5, ratio


def test_latent_scale_is_one_over_the_latents_std():
    module = AutoencoderModule(Autoencoder(channels=8, channel_mult=(1, 2), norm_groups=4), torch.optim.Adam,
                               latent_scale_window=10**9)  # a window that forgets nothing: the exact std
    batches = [3.0 * torch.randn(16, 4, 4, 4) + 1.0 for _ in range(5)]
    for z in batches:
        module.update_latent_scale(z)
    expected = 1 / torch.cat(batches).double().std(unbiased=False)
    torch.testing.assert_close(module.latent_scale, expected, rtol=1e-6, atol=0)


def test_discriminator_loss_reaches_only_its_parameters():
    """The summed objective trains the autoencoder through L_G and the discriminator through its hinge loss."""
    module = AutoencoderModule(Autoencoder(channels=8, channel_mult=(1, 2), norm_groups=4), torch.optim.Adam,
                               discriminator=PatchDiscriminator(1, 8, num_layers=1), disc_start=0, kl_weight=0.0)
    batch = {"image": torch.rand(4, 1, 16, 16) * 2 - 1}
    module.log = module.log_dict = lambda *a, **k: None
    module.discriminator.requires_grad_(False)  # L_G alone: nothing may reach the discriminator
    x_hat = module.autoencoder(batch["image"])[0]
    (-module.discriminator(x_hat).mean()).backward()
    assert all(p.grad is None for p in module.discriminator.parameters())
    module.discriminator.requires_grad_(True)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in module.discriminator.parameters())
    assert module.autoencoder.decoder.last_layer.grad is not None


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("autoencoder")
    trainer = run(make_cfg(tmp, "model=autoencoder", *TINY_AUTOENCODER, "trainer.max_steps=4",
                           "callbacks.checkpoint.every_n_train_steps=4", "callbacks.sample_grid.every_n_steps=4"))
    return tmp / "checkpoints" / "last.ckpt", trainer.lightning_module, tmp


def test_autoencoder_run_writes_reconstructions_and_psnr(autoencoder_ckpt):
    _, module, tmp = autoencoder_ckpt
    grid = tmp / "samples" / "step_000004.png"
    assert grid.is_file() and Image.open(grid).size[0] > 8
    metrics = (tmp / "csv" / "metrics.csv").read_text()
    assert "val/psnr" in metrics and "train/latent_scale" in metrics
    assert float(module.latent_scale) != 1.0  # estimated from the training latents


def test_first_stage_restores_weights_and_scale_from_the_checkpoint(autoencoder_ckpt):
    path, module, _ = autoencoder_ckpt
    stage = load_first_stage(ckpt=str(path))
    assert isinstance(stage, AutoencoderFirstStage)
    assert stage.scale_factor == pytest.approx(float(module.latent_scale), rel=1e-12)
    assert stage.latent_shape(8) == (4, 4, 4)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    module.eval()
    expected = module.autoencoder.encode(x).mean * float(module.latent_scale)
    torch.testing.assert_close(stage.encode(x), expected)
    reconstruction = module.autoencoder.decode(module.autoencoder.encode(x).mean)
    torch.testing.assert_close(stage.decode(stage.encode(x)), reconstruction)
    assert load_first_stage(ckpt=str(path), scale_factor=0.5).scale_factor == 0.5


def test_first_stage_errors_name_the_problem(tmp_path, autoencoder_ckpt):
    with pytest.raises(ValueError, match="exactly one first stage"):
        load_first_stage()
    with pytest.raises(ValueError, match="both were given"):
        load_first_stage(ckpt="a", pretrained="b")
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing).replace(".", r"\.") + ".*model=autoencoder"):
        load_first_stage(ckpt=str(missing))
    not_an_autoencoder = tmp_path / "diffusion.ckpt"
    torch.save({"state_dict": {}, "difflab_config": {"model": {"_target_": "difflab.lightning.DiffusionModule"}}},
               not_an_autoencoder)
    with pytest.raises(ValueError, match="is not an autoencoder checkpoint"):
        load_first_stage(ckpt=str(not_an_autoencoder))


def tiny_autoencoder_kl(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    return vae, tmp_path / "vae"


def test_diffusers_autoencoder_kl_as_first_stage(tmp_path):
    vae, folder = tiny_autoencoder_kl(tmp_path)
    stage = load_first_stage(pretrained=str(folder), local_files_only=True)
    assert isinstance(stage, DiffusersFirstStage)
    assert stage.scale_factor == pytest.approx(0.18215) and stage.shift_factor == 0.0
    assert (stage.in_channels, stage.latent_channels, stage.downsampling_factor) == (1, 4, 2)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    z = stage.encode(x)
    torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * 0.18215)
    torch.testing.assert_close(stage.decode(z), vae.decode(z / 0.18215).sample)
    # the spec rebuilds the architecture; the weights come from a state dict (an LDM checkpoint's)
    rebuilt = instantiate(stage.spec())
    rebuilt.load_state_dict(stage.state_dict())
    torch.testing.assert_close(rebuilt.encode(x), z)
    with pytest.raises(ValueError, match="could not load a diffusers AutoencoderKL from"):
        load_first_stage(pretrained=str(tmp_path / "missing"), local_files_only=True)


@pytest.fixture(scope="module")
def ldm_run(autoencoder_ckpt, tmp_path_factory):
    path, _, _ = autoencoder_ckpt
    tmp = tmp_path_factory.mktemp("ldm")
    ae_copy = tmp / "autoencoder.ckpt"
    ae_copy.write_bytes(path.read_bytes())
    trainer = run(make_cfg(tmp, "model=ldm", f"first_stage.ckpt={ae_copy}", "network=latent_small",
                           "network.model_channels=16", "network.head_dim=8", "network.norm_groups=8",
                           "network.num_res_blocks=1", "sampler.num_steps=4"))
    ae_copy.unlink()  # the LDM checkpoint must stand on its own
    return tmp, trainer.lightning_module


def test_ldm_trains_on_latents_and_reloads_without_the_autoencoder_file(ldm_run):
    tmp, trained = ldm_run
    assert isinstance(trained, LatentDiffusionModule)
    assert trained.image_shape == (4, 4, 4) and trained.pipeline().pixel_shape == (1, 8, 8)
    assert len(trained._latent_cache) > 0  # cache_latents: posteriors kept after their first encoding
    assert (tmp / "samples" / "step_000002.png").is_file()
    module = load_module(tmp / "checkpoints" / "last.ckpt")
    assert module.first_stage.scale_factor == trained.first_stage.scale_factor
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    images = module.pipeline()(3, seed=0)
    assert images.shape == (3, 1, 8, 8) and 0 <= images.min() and images.max() <= 1


def test_ldm_editing_in_latent_space(ldm_run):
    _, module = ldm_run
    pipe = module.pipeline()
    x = torch.rand(2, 1, 8, 8)
    # strength 0 returns decode(encode(x))
    expected = (module.first_stage.decode(module.first_stage.encode(x * 2 - 1)).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(pipe(init_image=x, strength=0.0), expected)
    # strength 1 is generation from noise with the same seed
    torch.testing.assert_close(pipe(init_image=x, strength=1.0, seed=4), pipe(2, seed=4), atol=0, rtol=0)
    # inpainting keeps the known pixels (pasted back after decoding)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    out = pipe(init_image=x, mask=mask, seed=1)
    keep = mask.expand_as(x) == 0
    torch.testing.assert_close(out[keep], x[keep], atol=1e-6, rtol=0)
    assert pipe._latent_mask(mask).shape == (1, 1, 4, 4) and pipe._latent_mask(mask).sum() == 4


def test_ldm_with_a_mismatched_network_fails_at_start(autoencoder_ckpt, tmp_path):
    path, _, _ = autoencoder_ckpt
    with pytest.raises(Exception, match="set network.in_channels=4"):
        run(make_cfg(tmp_path, "model=ldm", f"first_stage.ckpt={path}", "network=tiny"))


def test_sample_cli_edits_with_an_ldm(ldm_run, tmp_path):
    tmp, _ = ldm_run
    ckpt = tmp / "checkpoints" / "last.ckpt"
    Image.new("L", (8, 8), 200).save(tmp_path / "in.png")
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    mask.save(tmp_path / "mask.png")
    out = sample(sample_cfg(f"ckpt={ckpt}", f"init_image={tmp_path / 'in.png'}", "strength=0.5", "n=2", "label=3",
                            f"out={tmp_path / 'img2img'}", "progress=false"))
    assert sorted(p.name for p in out.glob("label3_*.png")) == ["label3_000_seed0.png", "label3_001_seed1.png"]
    assert Image.open(out / "grid.png").size == (2 * 10 + 2, 2 * 10 + 2)  # the input's row, then the samples
    out = sample(sample_cfg(f"ckpt={ckpt}", f"init_image={tmp_path / 'in.png'}", f"mask={tmp_path / 'mask.png'}",
                            "n=2", "label=3", f"out={tmp_path / 'inpaint'}", "progress=false"))
    result = torch.tensor(list(Image.open(out / "label3_000_seed0.png").convert("L").getdata())).reshape(8, 8)
    assert (result[:, 4:] == 200).all()  # the kept half
    out = sample(sample_cfg(f"ckpt={ckpt}", f"invert={tmp_path / 'in.png'}", "source_label=3", "label=[3,5]",
                            f"out={tmp_path / 'invert'}", "progress=false"))
    assert {p.name for p in out.glob("inverted_*.png")} == {"inverted_label3.png", "inverted_label5.png"}


def test_sample_cli_editing_errors(ldm_run, tmp_path):
    tmp, _ = ldm_run
    ckpt = tmp / "checkpoints" / "last.ckpt"
    Image.new("L", (8, 8), 200).save(tmp_path / "in.png")
    with pytest.raises(ValueError, match="mask= needs the image to inpaint"):
        sample(sample_cfg(f"ckpt={ckpt}", f"mask={tmp_path / 'in.png'}", f"out={tmp_path / 'a'}"))
    with pytest.raises(ValueError, match="use sampler=ddim with eta=0"):
        sample(sample_cfg(f"ckpt={ckpt}", f"invert={tmp_path / 'in.png'}", "sampler=ddpm", "steps=3",
                          f"out={tmp_path / 'b'}", "progress=false"))
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.png"):
        sample(sample_cfg(f"ckpt={ckpt}", f"init_image={tmp_path / 'nope.png'}", f"out={tmp_path / 'c'}"))


def test_latent_cache_on_disk_is_written_then_reused(autoencoder_ckpt, tmp_path, monkeypatch):
    path, _, _ = autoencoder_ckpt
    cache = tmp_path / "latents"
    overrides = ["model=ldm", f"first_stage.ckpt={path}", *TINY_LATENT_NETWORK, f"model.latent_cache_dir={cache}",
                 "data.batch_size=64", "trainer.max_steps=30", "trainer.val_check_interval=30",
                 "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=30"]
    first = run(make_cfg(tmp_path / "a", *overrides)).lightning_module  # 25 steps per epoch, then 5 more
    files = list(cache.glob("latents_sklearn_digits_*_rank0.pt"))
    assert len(files) == 1
    saved = torch.load(files[0], weights_only=True)
    assert len(saved["index"]) == first._saved_cache_size == len(first._latent_cache) >= 25 * 64
    index = int(saved["index"][0])
    torch.testing.assert_close(saved["mean"][0], first._latent_cache[index][0])
    # the posterior stored is the first stage's, for the dataset image of that index
    image = first.trainer.datamodule.dataset[index]["image"][None]
    torch.testing.assert_close(saved["mean"][0], first.first_stage.scaled_moments(image)[0][0], atol=1e-5, rtol=1e-5)
    calls = []
    encode = AutoencoderFirstStage.scaled_moments
    monkeypatch.setattr(AutoencoderFirstStage, "scaled_moments",
                        lambda self, x: calls.append(len(x)) or encode(self, x))
    run(make_cfg(tmp_path / "b", *overrides, "trainer.max_steps=2"))
    assert calls == []  # every training image's posterior came from the file
    run(make_cfg(tmp_path / "c", *overrides, "trainer.max_steps=2", "first_stage.scale_factor=0.5"))
    assert calls == [64, 64]  # another first stage (its scale differs) encodes afresh


def test_latent_cache_is_refused_for_randomly_flipped_data(autoencoder_ckpt, tmp_path):
    path, _, _ = autoencoder_ckpt
    folder = tmp_path / "images" / "digit"
    folder.mkdir(parents=True)
    for i in range(20):
        Image.new("L", (8, 8), i * 10).save(folder / f"{i}.png")
    with pytest.warns(UserWarning, match="cache_latents is off"):
        trainer = run(make_cfg(tmp_path / "run", "model=ldm", f"first_stage.ckpt={path}", *TINY_LATENT_NETWORK,
                               "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.channels=1",
                               "data.image_size=8", "data.batch_size=4", "data.num_workers=0", "data.num_classes=1",
                               "data.dataset.random_flip=true"))
    assert not trainer.lightning_module.cache_latents and not trainer.lightning_module._latent_cache
