"""Image-to-image, inpainting and DDIM inversion through the Pipeline, on the closed-form denoiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analytic import MixtureDenoiser
from difflab.diffusion import (
    DDIMSampler,
    DDPMSampler,
    Denoiser,
    DPMSolverPlusPlus2MSampler,
    EulerSampler,
    LossWeighting,
    NoiseSchedule,
    get_prediction,
)
from difflab.diffusion.editing import repaint, strength_start_index
from difflab.diffusion.noise import randn
from difflab.lightning import DiffusionModule

SHAPE = (1, 4, 4)


class AnalyticNetwork(nn.Module):
    """The closed-form optimal prediction for i.i.d. Gaussian-mixture data (within [-1, 1] but for 1e-6 of it,
    so that the pipeline's final clamp is immaterial), as a network module."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str):
        super().__init__()
        self.denoiser = MixtureDenoiser(schedule, prediction_type, means=(-0.5, 0.4), stds=(0.1, 0.12))
        self.unused = nn.Parameter(torch.zeros(()))  # something for the optimizer and EMA to hold

    def forward(self, x_t, t, **condition):
        return self.denoiser(x_t, t)


def analytic_module(prediction_type: str = "v_prediction", sampler=None):
    schedule = NoiseSchedule.cosine()
    return DiffusionModule(AnalyticNetwork(schedule, prediction_type), schedule, sampler or DDIMSampler(100),
                           get_prediction(prediction_type), LossWeighting(), lambda params: torch.optim.SGD(params, 0),
                           image_shape=SHAPE)


def data(module: DiffusionModule, n: int, seed: int = 0) -> torch.Tensor:
    """n images in [0, 1] (the pipeline's range) from the mixture."""
    x = module.network.denoiser.sample_data(n * 16, torch.Generator().manual_seed(seed))
    return (x.float().reshape(n, *SHAPE).clamp(-1, 1) + 1) / 2


def test_strength_maps_to_diffusers_start_index():
    assert strength_start_index(50, 1.0) == 0
    assert strength_start_index(50, 0.6) == 20  # 30 of 50 steps run
    assert strength_start_index(50, 0.0) == 50
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        strength_start_index(50, 1.5)


def test_strength_zero_returns_the_input():
    pipe = analytic_module().pipeline()
    x = data(analytic_module(), 3)
    torch.testing.assert_close(pipe(init_image=x, strength=0.0, seed=0), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler", [DDIMSampler(20), DDPMSampler(20), EulerSampler(20)])
def test_strength_one_equals_generation_from_noise(sampler):
    module = analytic_module(sampler=sampler)
    pipe, x = module.pipeline(), data(module, 3)
    torch.testing.assert_close(pipe(init_image=x, strength=1.0, seed=7), pipe(3, seed=7), atol=0, rtol=0)


def test_partial_strength_starts_from_the_noised_input():
    """strength s runs the last int(N s) steps from q(x_t | x0) at t = grid[N - int(N s)]; checked against a
    hand-built start state and the sampler's own loop on the rest of the grid."""
    module = analytic_module(sampler=DDIMSampler(10))
    pipe, x = module.pipeline(), data(module, 2)
    out = pipe(init_image=x, strength=0.6, seed=3)
    noise = randn((2, *SHAPE), [torch.Generator().manual_seed(3 + k) for k in range(2)])
    grid = module.sampler.grid(module.schedule)
    rest = grid.from_index(4)
    assert len(rest) == 6 and rest.timesteps[0] == grid.timesteps[4]
    abar = float(module.schedule.alphas_cumprod[rest.timesteps[0]])
    x_t = abar**0.5 * (x * 2 - 1) + (1 - abar) ** 0.5 * noise
    denoiser = Denoiser(module.ema, module.schedule, module.loss.prediction)
    expected = (module.sampler.sample(denoiser, x_t, rest).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # low strength stays close to the input, high strength moves away from it
    near, far = pipe(init_image=x, strength=0.2, seed=3), pipe(init_image=x, strength=0.9, seed=3)
    assert (near - x).abs().mean() < (far - x).abs().mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_then_regeneration_reconstructs(prediction_type):
    module = analytic_module(prediction_type, sampler=DDIMSampler(200))
    pipe, x = module.pipeline(), data(module, 4)
    x_T = pipe.invert(x)
    assert x_T.shape == x.shape and 0.6 < x_T.std() < 1.4  # noise-like
    regenerated = pipe(noise=x_T)
    assert (regenerated - x).abs().max() < 1e-2, (regenerated - x).abs().max()


def test_inversion_needs_deterministic_ddim():
    pipe = analytic_module(sampler=DDPMSampler(10)).pipeline()
    with pytest.raises(ValueError, match="use sampler=ddim with eta=0"):
        pipe.invert(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="use sampler=ddim with eta=0"):
        pipe.invert(torch.zeros(1, *SHAPE), sampler=DDIMSampler(10, eta=1.0))


@pytest.mark.parametrize("sampler", [DDIMSampler(20), DDIMSampler(20, eta=1.0), DDPMSampler(20), EulerSampler(20),
                                     DPMSolverPlusPlus2MSampler(20)], ids=repr)
@pytest.mark.parametrize("resample", [1, 3])
def test_inpainting_keeps_the_known_region_exactly(sampler, resample):
    module = analytic_module(sampler=sampler)
    pipe, x = module.pipeline(), data(module, 2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # regenerate the top half
    out = pipe(init_image=x, mask=mask, resample=resample, seed=0)
    torch.testing.assert_close(out[..., 2:, :], x[..., 2:, :], atol=1e-6, rtol=0)
    assert (out[..., :2, :] - x[..., :2, :]).abs().max() > 1e-2  # the rest was regenerated


@pytest.mark.parametrize("sampler", [DDIMSampler(25), EulerSampler(25), DPMSolverPlusPlus2MSampler(25)], ids=repr)
def test_repaint_takes_the_samplers_own_step(sampler):
    """mask = 1 everywhere is the sampler's plain loop (RePaint calls its step); mask = 0 returns the known image."""
    module = analytic_module()
    denoiser = Denoiser(module.ema, module.schedule, module.loss.prediction)
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    known = data(module, 3) * 2 - 1
    plain = sampler.sample(denoiser, x_T)
    full = repaint(sampler, denoiser, x_T, known, torch.ones(1, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(full, plain, atol=1e-6, rtol=0)
    none = repaint(sampler, denoiser, x_T, known, torch.zeros(1, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(none, known, atol=1e-6, rtol=0)


def test_mask_needs_an_image_and_resample_must_be_positive():
    pipe = analytic_module(sampler=DDIMSampler(5)).pipeline()
    with pytest.raises(ValueError, match="pass init_image= with mask="):
        pipe(1, mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="resample must be >= 1"):
        pipe(init_image=torch.zeros(1, *SHAPE), mask=torch.ones(1, 1, 4, 4), resample=0)


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
