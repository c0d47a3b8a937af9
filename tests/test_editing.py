"""Image-to-image, inpainting and DDIM inversion through DiffusionModule, on the closed-form denoiser."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from analytic import MixtureDenoiser
from difflab.diffusion import DDIMSampler, DDPMSampler, EulerSampler, LossWeighting, NoiseSchedule, get_prediction
from difflab.diffusion.editing import repaint, strength_start_index
from difflab.lightning import DiffusionModule

SHAPE = (1, 4, 4)


class AnalyticNetwork(nn.Module):
    """The closed-form optimal prediction for i.i.d. Gaussian-mixture data (within [-1, 1] but for 1e-6 of it,
    so that generate's final clamp is immaterial), as a network module."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str):
        super().__init__()
        self.denoiser = MixtureDenoiser(schedule, prediction_type, means=(-0.5, 0.4), stds=(0.1, 0.12))
        self.unused = nn.Parameter(torch.zeros(()))  # something for the optimizer and EMA to hold

    def forward(self, x_t, t, **condition):
        return self.denoiser(x_t, t)


def analytic_module(prediction_type: str = "v_prediction", sampler=None):
    sampler = sampler or partial(DDIMSampler, num_steps=100)
    schedule = NoiseSchedule.cosine()
    return DiffusionModule(AnalyticNetwork(schedule, prediction_type), schedule, sampler,
                           get_prediction(prediction_type), LossWeighting(), partial(torch.optim.SGD, lr=0.0),
                           image_shape=SHAPE)


def data(module: DiffusionModule, n: int, seed: int = 0) -> torch.Tensor:
    x = module.network.denoiser.sample_data(n * 16, torch.Generator().manual_seed(seed))
    return x.float().reshape(n, *SHAPE).clamp(-1, 1)


def test_strength_maps_to_diffusers_start_index():
    assert strength_start_index(50, 1.0) == 0
    assert strength_start_index(50, 0.6) == 20  # 30 of 50 steps run
    assert strength_start_index(50, 0.0) == 50
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        strength_start_index(50, 1.5)


def test_strength_zero_returns_the_input():
    module = analytic_module()
    x = data(module, 3).clamp(-1, 1)
    out = module.generate(3, init=x, strength=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=0, rtol=0)


@pytest.mark.parametrize("sampler", [partial(DDIMSampler, num_steps=20), partial(DDPMSampler, num_steps=20),
                                     partial(EulerSampler, num_steps=20)])
def test_strength_one_equals_generation_from_noise(sampler):
    module = analytic_module(sampler=sampler)
    x = data(module, 3)
    edited = module.generate(3, init=x, strength=1.0, generator=torch.Generator().manual_seed(7))
    generated = module.generate(3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(edited, generated, atol=0, rtol=0)


def test_partial_strength_starts_from_the_noised_input():
    """strength s runs the last int(N s) steps from q(x_t | x0) at t = grid[N - int(N s)]; checked against a
    hand-built start state and the sampler's own loop on the shortened grid."""
    module = analytic_module(sampler=partial(DDIMSampler, num_steps=10))
    x = data(module, 2)
    out = module.generate(2, init=x, strength=0.6, generator=torch.Generator().manual_seed(3))
    noise = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(3))
    rest = module.sampler.from_step(4)
    assert rest.num_steps == 6 and rest.timesteps[0] == module.sampler.timesteps[4]
    abar = float(module.schedule.alphas_cumprod[rest.timesteps[0]])
    x_t = abar**0.5 * x + (1 - abar) ** 0.5 * noise
    expected = rest.sample(module.ema, x_t, prediction_type=module.loss.prediction).clamp(-1, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # low strength stays close to the input, high strength moves away from it
    near = module.generate(2, init=x, strength=0.2, generator=torch.Generator().manual_seed(3))
    far = module.generate(2, init=x, strength=0.9, generator=torch.Generator().manual_seed(3))
    assert (near - x.clamp(-1, 1)).abs().mean() < (far - x.clamp(-1, 1)).abs().mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_then_regeneration_reconstructs(prediction_type):
    module = analytic_module(prediction_type, sampler=partial(DDIMSampler, num_steps=200))
    x = data(module, 4)
    x_T = module.invert(x)
    assert x_T.shape == x.shape and 0.6 < x_T.std() < 1.4  # noise-like
    regenerated = module.generate(4, noise=x_T)
    assert (regenerated - x).abs().max() < 2e-2, (regenerated - x).abs().max()


def test_inversion_needs_deterministic_ddim():
    module = analytic_module(sampler=partial(DDPMSampler, num_steps=10))
    with pytest.raises(ValueError, match="use sampler=ddim with eta=0"):
        module.invert(torch.zeros(1, *SHAPE))


@pytest.mark.parametrize("sampler", [partial(DDIMSampler, num_steps=20), partial(DDIMSampler, num_steps=20, eta=1.0),
                                     partial(DDPMSampler, num_steps=20)])
@pytest.mark.parametrize("resample", [1, 3])
def test_inpainting_keeps_the_known_region_exactly(sampler, resample):
    module = analytic_module(sampler=sampler)
    x = data(module, 2).clamp(-1, 1)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # regenerate the top half
    out = module.generate(2, init=x, mask=mask, resample=resample, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[..., 2:, :], x[..., 2:, :], atol=0, rtol=0)
    assert (out[..., :2, :] - x[..., :2, :]).abs().max() > 1e-2  # the rest was regenerated


def test_repaint_reduces_to_the_sampler_and_to_the_input_at_the_extremes():
    """mask = 1 everywhere is plain DDIM (eta = 0) sampling; mask = 0 everywhere returns the known image."""
    module = analytic_module()
    sampler = DDIMSampler(module.schedule, num_steps=25)
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    known = data(module, 3)
    plain = sampler.sample(module.ema, x_T, prediction_type="v_prediction")
    full = repaint(sampler, module.ema, x_T, known, torch.ones(1, 1, 4, 4), "v_prediction",
                   generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(full, plain, atol=1e-6, rtol=0)
    none = repaint(sampler, module.ema, x_T, known, torch.zeros(1, 1, 4, 4), "v_prediction",
                   generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(none, known, atol=1e-6, rtol=0)


def test_repaint_rejects_ode_samplers_and_mask_needs_init():
    module = analytic_module(sampler=partial(EulerSampler, num_steps=5))
    with pytest.raises(ValueError, match="use sampler=ddim or sampler=ddpm"):
        module.generate(1, init=torch.zeros(1, *SHAPE), mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="pass init= with mask="):
        module.generate(1, mask=torch.ones(1, 1, 4, 4))


def test_load_image_and_mask(tmp_path):
    from PIL import Image

    from difflab.data.images import load_image, load_mask

    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    image = load_image(tmp_path / "red.png", channels=3, size=8)
    assert image.shape == (1, 3, 8, 8)
    torch.testing.assert_close(image[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert load_image(tmp_path / "red.png", channels=1, size=8).shape == (1, 1, 8, 8)
    mask = Image.new("L", (8, 8), 0)
    mask.paste(200, (0, 0, 8, 4))  # light grey top half: regenerate
    mask.save(tmp_path / "mask.png")
    loaded = load_mask(tmp_path / "mask.png", size=8)
    assert loaded.shape == (1, 1, 8, 8) and loaded[..., :4, :].eq(1).all() and loaded[..., 4:, :].eq(0).all()
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image(tmp_path / "broken.png", channels=1, size=8)
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.png"):
        load_mask(tmp_path / "missing.png", size=8)
