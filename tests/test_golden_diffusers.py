"""Golden conformance: our schedules and samplers against diffusers' schedulers on the same model and noise.

Two comparisons per case:
* as shipped: diffusers in float32 against ours on float32 input, to 1e-4;
* exact: diffusers' update rules fed float64 tables against ours in float64, to 1e-9. This is the real
  conformance check. For the cosine schedule with epsilon prediction, DPM-Solver++ starts at t = 999
  where alpha = 4.9e-5, so a float32 eps is amplified ~2e4 times in x0 = (x - sigma eps) / alpha and any
  float32 implementation (ours on float32 input included) moves by ~1e-3; that case is checked exactly only.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from analytic import MixtureDenoiser
from difflab.diffusion import NoiseSchedule, get_sampler, spaced_timesteps

diffusers = pytest.importorskip("diffusers")

# our name -> diffusers' beta_schedule and the constants we default to
DIFFUSERS_SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "sigmoid": dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02),
}
PREDICTIONS = ["epsilon", "v_prediction"]


def x_T(dtype=torch.float32):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def run_scheduler(scheduler, model_fn, x, **step_kwargs):
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model_fn(x_in, t.long().expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


def use_float64_tables(scheduler, schedule, num_steps):
    """Give a multistep scheduler (DPM-Solver, UniPC) our float64 alpha_bar and its sigmas, set for num_steps; run it
    under ``mock.patch.object(torch, "float32", torch.float64)`` so that its own float32 casts keep float64."""
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.set_timesteps(num_steps)
    abar = schedule.alphas_cumprod[scheduler.timesteps]
    scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("name", list(DIFFUSERS_SCHEDULES))
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_betas_equal_diffusers(name, zero_terminal_snr):
    ours = NoiseSchedule.from_name(name, zero_terminal_snr=zero_terminal_snr)
    theirs = diffusers.DDPMScheduler(**DIFFUSERS_SCHEDULES[name])
    if zero_terminal_snr:
        # diffusers rescales in float32, which loses ~2e-6 in the last betas (1 - abar_t / abar_{t-1} with
        # abar ~ 1e-5); its rescale run on float64 betas is the exact reference
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        expected = rescale_zero_terminal_snr(NoiseSchedule.from_name(name).betas)
        torch.testing.assert_close(ours.betas, expected, atol=1e-12, rtol=0)
        assert ours.alphas_cumprod[-1] == 0 and ours.snr[-1] == 0
        theirs = diffusers.DDPMScheduler(**DIFFUSERS_SCHEDULES[name], rescale_betas_zero_snr=True)
        torch.testing.assert_close(ours.betas, theirs.betas.double(), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(ours.betas, theirs.betas.double(), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50, 333, 1000])
def test_grids_equal_diffusers(spacing, num_steps):
    schedule = NoiseSchedule.linear()
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing)
    ddim.set_timesteps(num_steps)
    assert torch.equal(spaced_timesteps(1000, num_steps, spacing), ddim.timesteps)
    assert torch.equal(get_sampler("ddim", num_steps=num_steps, timestep_spacing=spacing).grid(schedule).timesteps,
                       ddim.timesteps)
    if num_steps < 1000:
        dpm = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
        dpm.set_timesteps(num_steps)
        ours = get_sampler("dpmpp_2m", num_steps=num_steps, timestep_spacing=spacing)
        assert torch.equal(ours.grid(schedule).timesteps, dpm.timesteps)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_equals_diffusers(name, prediction_type):
    schedule = NoiseSchedule.from_name(name)
    model_fn = MixtureDenoiser(schedule, prediction_type)
    sampler = get_sampler("ddim", num_steps=50, eta=0.0)

    scheduler = diffusers.DDIMScheduler(**DIFFUSERS_SCHEDULES[name], prediction_type=prediction_type,
                                        clip_sample=False)
    scheduler.set_timesteps(50)
    expected = run_scheduler(scheduler, model_fn, x_T())
    ours = sampler.sample(model_fn.as_denoiser(), x_T())
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().max() <= 1e-4

    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    expected = run_scheduler(scheduler, model_fn, x_T(torch.float64))
    ours = sampler.sample(model_fn.as_denoiser(), x_T(torch.float64))
    assert (ours - expected).abs().max() <= 1e-9


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_dpmpp_2m_equals_diffusers(name, prediction_type):
    schedule = NoiseSchedule.from_name(name)
    model_fn = MixtureDenoiser(schedule, prediction_type)
    sampler = get_sampler("dpmpp_2m", num_steps=20)

    scheduler = diffusers.DPMSolverMultistepScheduler(
        **DIFFUSERS_SCHEDULES[name], prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2
    )
    if not (name == "cosine" and prediction_type == "epsilon"):  # float32-ill-conditioned: see module doc
        scheduler.set_timesteps(20)
        expected = run_scheduler(scheduler, model_fn, x_T())
        ours = sampler.sample(model_fn.as_denoiser(), x_T())
        assert (ours - expected).abs().max() <= 1e-4

    # diffusers' DPM-Solver casts its tables and the sample to float32; feed it float64 ones
    use_float64_tables(scheduler, schedule, 20)
    with mock.patch.object(torch, "float32", torch.float64):
        expected = run_scheduler(scheduler, model_fn, x_T(torch.float64))
    ours = sampler.sample(model_fn.as_denoiser(), x_T(torch.float64))
    assert (ours - expected).abs().max() <= 1e-9


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1000, 25])
def test_ddpm_posterior_equals_diffusers(name, prediction_type, num_steps):
    """Every step's posterior mean (step with zero noise) and variance equal DDPMScheduler's."""
    schedule = NoiseSchedule.from_name(name)
    model_fn = MixtureDenoiser(schedule, prediction_type)
    scheduler = diffusers.DDPMScheduler(**DIFFUSERS_SCHEDULES[name], prediction_type=prediction_type,
                                        clip_sample=False)
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(num_steps)
    sampler = get_sampler("ddpm", num_steps=num_steps)
    assert torch.equal(sampler.grid(schedule).timesteps, scheduler.timesteps)

    # our posterior at each step, recorded through NoiseSchedule.posterior with the sampler's x0 estimate
    x = x_T(torch.float64)
    no_noise = mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                          lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    timesteps = scheduler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), t)
        output = model_fn(x, tt)
        with no_noise:
            expected_mean = scheduler.step(output, t, x).prev_sample
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x0, _ = get_prediction_x0(schedule, prediction_type, output, x, tt)
        mean, variance = schedule.posterior(x0, x, tt, torch.full_like(tt, prev))
        torch.testing.assert_close(mean, expected_mean, atol=1e-9, rtol=0)
        if t > 0:
            expected_var = scheduler._get_variance(t).double()
            torch.testing.assert_close(variance.flatten(), expected_var.expand(x.shape[0]), atol=1e-12, rtol=1e-9)
        x = mean

    # the sampler's own loop, with noise off, walks the same means
    sampler_means = get_sampler("ddpm", num_steps=num_steps, variance="small")
    with mock.patch("difflab.diffusion.samplers.ddpm.randn_like", lambda x, generator: torch.zeros_like(x)):
        means = sampler_means.sample(model_fn.as_denoiser(), x_T(torch.float64))
    torch.testing.assert_close(means, x, atol=1e-9, rtol=0)


def get_prediction_x0(schedule, prediction_type, output, x, t):
    from difflab.diffusion import get_prediction

    alpha, sigma = schedule.alpha_sigma(t, x)
    return get_prediction(prediction_type).to_x0_eps(output, x, alpha, sigma)


@pytest.mark.parametrize("cls_name,ours", [("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_karras_samplers_equal_diffusers(cls_name, ours, prediction_type):
    """Euler and Heun against diffusers on a grid of integer timesteps (trailing spacing).

    Both start from the same x_T. (diffusers' own ``init_noise_sigma`` is sigma_max for trailing and
    linspace grids but sqrt(sigma_max^2 + 1) for leading ones; the latter is the VP-consistent scaling that
    makes Euler equal DDIM, and the one we always use.)
    """
    schedule = NoiseSchedule.scaled_linear()
    model_fn = MixtureDenoiser(schedule, prediction_type)
    scheduler = getattr(diffusers, cls_name)(**DIFFUSERS_SCHEDULES["scaled_linear"], prediction_type=prediction_type,
                                             timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    x = x_T() * (scheduler.sigmas[0] ** 2 + 1) ** 0.5
    expected = run_scheduler(scheduler, model_fn, x)
    sampler = get_sampler(ours, num_steps=10, timestep_spacing="trailing")
    result = sampler.sample(model_fn.as_denoiser(), x_T())
    assert (result - expected).abs().max() <= 1e-4
