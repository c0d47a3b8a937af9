"""Flow matching: the schedule, the velocity parameterisation and its loss, logit-normal levels, the flow grid,
diffusers' FlowMatchEulerDiscreteScheduler, every sampler from pure noise, the mixture recovered, the preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analytic import MixtureDenoiser, ks_distance
from configs import make_cfg
from difflab.cli.train import run
from difflab.diffusion import (
    Denoiser,
    DiffusionLoss,
    FlowPrediction,
    LogitNormalTimesteps,
    MinSNRWeighting,
    NoiseSchedule,
    available_samplers,
    get_sampler,
)
from difflab.diffusion.grid import flow_sigmas


def flow_time(schedule, t):
    """s of x_s = (1 - s) x0 + s eps at (fractional) timesteps t."""
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t, t)
    return sigma / (alpha + sigma)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_is_the_straight_path(shift):
    schedule = NoiseSchedule.flow(shift=shift)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    s = shift * u / (1 + (shift - 1) * u)
    torch.testing.assert_close(flow_time(schedule, torch.arange(1000)), s)
    assert float(schedule.alphas_cumprod[-1]) == 0.0 and schedule.zero_terminal_snr
    x0, eps = torch.randn(1000, 3, dtype=torch.float64), torch.randn(1000, 3, dtype=torch.float64)
    t = torch.arange(1000)
    alpha, sigma = schedule.alpha_sigma(t, x0)
    x_s = FlowPrediction().scale_input(schedule.add_noise(x0, eps, t), alpha, sigma)
    torch.testing.assert_close(x_s, (1 - s[:, None]) * x0 + s[:, None] * eps)


def test_velocity_round_trips_and_is_finite_at_pure_noise():
    prediction = FlowPrediction()
    abar = torch.tensor([0.0, 1e-6, 0.3, 0.9, 0.999999], dtype=torch.float64)[:, None]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0, eps = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    out_x0, out_eps = prediction.to_x0_eps(prediction.target(x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(out_x0, x0)
    torch.testing.assert_close(out_eps, eps)


def test_loss_is_the_flow_matching_loss_and_min_snr_weights_x0_errors():
    schedule = NoiseSchedule.flow()
    x0 = torch.randn(32, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    t = torch.linspace(0, 998, 32, dtype=torch.float64)
    network = lambda x, t: 0.5 * torch.tanh(x) - 0.001 * t.reshape(-1, 1, 1, 1)
    s = flow_time(schedule, t).reshape(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * noise
    u_hat = network(x_s, t)
    expected = (u_hat - (noise - x0)).pow(2).flatten(1).mean(1)
    out = DiffusionLoss("flow")(network, x0, schedule, t=t, noise=noise)
    torch.testing.assert_close(out.per_sample.double(), expected, rtol=1e-5, atol=0)
    snr = ((1 - s) / s).flatten() ** 2
    x0_error = (x_s - s * u_hat - x0).pow(2).flatten(1).mean(1)
    out = DiffusionLoss("flow", MinSNRWeighting(5.0))(network, x0, schedule, t=t, noise=noise)
    torch.testing.assert_close(out.per_sample.double(), snr.clamp(max=5.0) * x0_error, rtol=1e-5, atol=0)


def test_logit_normal_levels():
    """logit(s) of the drawn levels is N(0.5, 0.8^2) (KS within the DKW bound at delta = 1e-6); a shift moves s."""
    schedule, n = NoiseSchedule.flow(), 100_000
    t = LogitNormalTimesteps(mean=0.5, std=0.8)(n, schedule, generator=torch.Generator().manual_seed(0))
    s = flow_time(schedule, t)
    z = ((s / (1 - s)).log() - 0.5) / 0.8
    normal_cdf = lambda x: 0.5 * (1 + torch.erf(x / 2**0.5))
    assert ks_distance(z, normal_cdf) < math.sqrt(math.log(2 / 1e-6) / (2 * n))
    shifted = flow_time(schedule, LogitNormalTimesteps(shift=3.0)(n, schedule, generator=torch.Generator()))
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.01)  # shift 3 maps the median 1/2 to 3/4


def test_flow_grid_and_euler_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule.flow()

    def network(x_s, s):
        s = s.reshape(-1, *[1] * (x_s.ndim - 1)).to(x_s.dtype)
        return torch.tanh(1.2 * x_s) * (1 - 0.5 * s) - 0.3 * s * x_s.roll(1, -1)

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 12, 12))
    ours_sigmas = flow_sigmas(12, shift=3.0)
    ours_s = ours_sigmas[1:] / (1 + ours_sigmas[1:])  # flow times; diffusers keeps them in float32
    torch.testing.assert_close(ours_s, scheduler.sigmas[1:-1].double(), rtol=0, atol=1e-7)
    assert math.isinf(ours_sigmas[0]) and scheduler.sigmas[0] == 1
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_T = x.double()
    for t in scheduler.timesteps:
        x = scheduler.step(network(x, (t / 1000).expand(x.shape[0])), t, x).prev_sample
    sampler = get_sampler("euler", num_steps=12, sigma_schedule="flow", shift=3.0)
    ours = sampler.sample(Denoiser(lambda x_s, t: network(x_s, flow_time(schedule, t)), schedule, "flow"), x_T)
    assert (ours - x.double()).abs().max() <= 1e-5


@pytest.mark.parametrize("name", available_samplers())
def test_every_sampler_starts_from_pure_noise_on_the_flow_grid(name):
    schedule = NoiseSchedule.flow()
    sampler = get_sampler(name, num_steps=8, sigma_schedule="flow", shift=2.0)
    denoiser = MixtureDenoiser(schedule, "flow").as_denoiser()
    out = sampler.sample(denoiser, torch.randn(4, 50), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and float(out.std()) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name,steps,shift", [("euler", 100, 1.0), ("dpmpp_2m", 60, 3.0), ("heun", 30, 1.0)])
def test_flow_recovers_the_mixture(name, steps, shift):
    """The exact velocity field of a Gaussian mixture (E[eps - x0 | x_s]) integrated on the flow grid: KS distance
    within the tolerance of tests/test_sampler_distribution.py."""
    from test_sampler_distribution import TOLERANCE

    schedule = NoiseSchedule.flow()
    denoiser = MixtureDenoiser(schedule, "flow")
    sampler = get_sampler(name, num_steps=steps, sigma_schedule="flow", shift=shift)
    x_T = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))  # pure noise: s = 1
    assert ks_distance(sampler.sample(denoiser.as_denoiser(), x_T), denoiser.cdf) <= TOLERANCE


def test_mnist_flow_preset_trains_and_samples(tmp_path):
    trainer = run(make_cfg(tmp_path, "experiment=mnist_flow", "trainer.max_steps=3", "sampler.num_steps=3",
                           "callbacks.sample_grid.num_samples=4"))
    module = trainer.lightning_module
    assert isinstance(module.loss.prediction, FlowPrediction) and module.schedule.name == "flow"
    assert isinstance(module.loss.timestep_sampler, LogitNormalTimesteps)
    assert module.sampler.sigma_schedule == "flow"
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert (tmp_path / "samples").is_dir() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
