"""Sigma grids and sigma-space samplers equal k-diffusion's (Crowson's reference code for Karras et al. 2022).

Both sides get the same denoiser, the same float64 state, the same sigmas and, for the stochastic samplers, the
same noise in the same order; the final samples must agree to 1e-6 (they agree to rounding). k-diffusion is a
test-only reference, installed without its training stack (`pip install --no-deps k-diffusion`, as the README's
test command does); its samplers need only ``sampling.py`` and ``utils.py``, so the package's ``__init__`` (which
imports kornia, CLIP and the rest) is bypassed.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

from difflab.diffusion import Denoiser, NoiseSchedule, get_sampler
from difflab.diffusion.grid import Grid, exponential_sigmas, karras_sigmas

SHAPE = (3, 2, 4, 4)


@pytest.fixture(scope="module")
def kd():
    """k_diffusion.sampling and k_diffusion.external, loaded without k_diffusion/__init__.py."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is the reference of these tests: pip install --no-deps k-diffusion")
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    return types.SimpleNamespace(sampling=importlib.import_module("k_diffusion.sampling"),
                                 external=importlib.import_module("k_diffusion.external"))


@pytest.fixture
def float64_default():
    """k-diffusion builds its grids with the default dtype: float64 so that both sides compute in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def x0_model(x_vp, t):
    """A smooth, nonlinear, t-dependent x0 prediction, evaluated identically by both sides."""
    scale = (t.to(x_vp.dtype) / 1000).reshape(-1, *[1] * (x_vp.ndim - 1))
    return 0.8 * torch.tanh(1.3 * x_vp) + 0.2 * scale * x_vp.roll(1, dims=-1) - 0.1 * scale


def eps_model(x_vp, t):
    scale = (t.to(x_vp.dtype) / 1000).reshape(-1, *[1] * (x_vp.ndim - 1))
    return 0.9 * x_vp + 0.3 * torch.sin(2 * x_vp + scale) * (1 - scale)


@pytest.mark.parametrize("n,sigma_min,sigma_max,rho", [(10, 0.002, 80.0, 7.0), (25, 0.0292, 14.6, 3.0)])
def test_sigma_grids_equal_k_diffusion(kd, float64_default, n, sigma_min, sigma_max, rho):
    theirs = kd.sampling.get_sigmas_karras(n, sigma_min, sigma_max, rho=rho)
    torch.testing.assert_close(karras_sigmas(n, sigma_min, sigma_max, rho), theirs[:-1], rtol=1e-12, atol=0)
    assert theirs[-1] == 0
    theirs = kd.sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    torch.testing.assert_close(exponential_sigmas(n, sigma_min, sigma_max), theirs[:-1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule_name", ["linear", "scaled_linear", "cosine"])
def test_fractional_timesteps_equal_k_diffusion(kd, float64_default, schedule_name):
    """A sigma grid tells the network the fractional timestep k-diffusion's discrete wrappers tell it, and the
    default ends of the grid are the schedule's own."""
    schedule = NoiseSchedule.from_name(schedule_name)
    wrapper = kd.external.DiscreteSchedule(schedule.sigmas, quantize=False)
    grid = Grid.sigma_schedule(schedule, "karras", 15)
    sigmas = torch.tensor(grid.sigmas[:-1])
    torch.testing.assert_close(grid.timesteps, wrapper.sigma_to_t(sigmas), rtol=0, atol=1e-9)
    assert grid.timesteps[0] == pytest.approx(schedule.num_timesteps - 1) and grid.timesteps[-1] == pytest.approx(0)
    torch.testing.assert_close(schedule.t_to_abar(grid.timesteps), torch.tensor(grid.alphas_cumprod[:-1]),
                               rtol=1e-12, atol=0)


def sequential_noise(seed):
    """Noise as difflab's samplers draw it (float32 from one generator, then cast), one draw per call."""
    generator = torch.Generator().manual_seed(seed)
    return lambda shape, dtype: torch.randn(shape, generator=generator).to(dtype)


# (difflab sampler, its options, k-diffusion sampler, its options, how k-diffusion draws its noise)
CASES = [
    ("euler", {}, "sample_euler", {}, None),
    ("heun", {"max_sigma_ratio": math.inf}, "sample_heun", {}, None),
    ("dpmpp_2m", {}, "sample_dpmpp_2m", {}, None),
    ("euler", {"s_churn": 4.0}, "sample_euler", {"s_churn": 4.0}, "randn_like"),
    ("heun", {"s_churn": 6.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003, "max_sigma_ratio": math.inf},
     "sample_heun", {"s_churn": 6.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}, "randn_like"),
    ("euler_ancestral", {}, "sample_euler_ancestral", {}, "noise_sampler"),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9},
     "noise_sampler"),
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}, "noise_sampler"),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}, "sample_dpmpp_2m_sde",
     {"solver_type": "heun", "eta": 0.7}, "noise_sampler"),
    ("dpmpp_2m_sde", {"eta": 0.0}, "sample_dpmpp_2m_sde", {"eta": 0.0}, None),
]


@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
@pytest.mark.parametrize("ours,options,theirs,their_options,noise", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_sampler_equals_k_diffusion(kd, monkeypatch, ours, options, theirs, their_options, noise, sigma_schedule):
    schedule = NoiseSchedule.from_name("linear")
    sampler = get_sampler(ours, num_steps=12, sigma_schedule=sigma_schedule, **options)
    grid = sampler.grid(schedule)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours_out = sampler.sample(Denoiser(x0_model, schedule, "sample"), x_T, generator=torch.Generator().manual_seed(7))

    def model(x_ve, sigma):  # k-diffusion's denoiser D(x; sigma) from the same x0 prediction in the VP frame
        scale = (1 + sigma**2).sqrt().reshape(-1, *[1] * (x_ve.ndim - 1))
        return x0_model(x_ve / scale, schedule.sigma_to_t(sigma))

    draw = sequential_noise(7)
    if noise == "randn_like":  # k-diffusion draws churn noise at every step, difflab only where it churns
        churns = iter([options.get("s_tmin", 0) <= s <= options.get("s_tmax", math.inf) for s in grid.sigmas[:-1]])
        monkeypatch.setattr(torch, "randn_like",
                            lambda x: draw(x.shape, x.dtype) if next(churns) else torch.zeros_like(x))
    if noise == "noise_sampler":
        their_options = {**their_options, "noise_sampler": lambda sigma, sigma_next: draw(SHAPE, torch.float64)}
    sigmas = torch.tensor(grid.sigmas, dtype=torch.float64)
    theirs_out = getattr(kd.sampling, theirs)(model, x_T / grid.alphas_cumprod[0] ** 0.5, sigmas, disable=True,
                                              **their_options)
    monkeypatch.undo()
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=1e-6)
    assert not torch.allclose(ours_out, x_T, atol=1e-2)  # the loop did something


@pytest.mark.parametrize("ours,theirs", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                         ("dpmpp_2m", "sample_dpmpp_2m")])
def test_vp_model_on_karras_grid_equals_k_diffusion_wrapper(kd, float64_default, ours, theirs):
    """An epsilon-prediction model trained on discrete timesteps samples on a Karras grid exactly as under
    k-diffusion's ``DiscreteEpsDDPMDenoiser`` (continuous timesteps, ``quantize=False``)."""
    schedule = NoiseSchedule.from_name("scaled_linear")
    options = {"max_sigma_ratio": math.inf} if ours == "heun" else {}
    sampler = get_sampler(ours, num_steps=10, sigma_schedule="karras", **options)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ours_out = sampler.sample(Denoiser(eps_model, schedule, "epsilon"), x_T)

    wrapper = kd.external.DiscreteEpsDDPMDenoiser(eps_model, schedule.alphas_cumprod, quantize=False)
    sigmas = kd.sampling.get_sigmas_karras(10, wrapper.sigma_min.item(), wrapper.sigma_max.item(), rho=7.0)
    theirs_out = getattr(kd.sampling, theirs)(wrapper, x_T * (1 + sigmas[0] ** 2).sqrt(), sigmas, disable=True)
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=1e-6)
