"""Sigma grids (Karras, exponential): fractional timesteps, every sampler on them, churn, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from analytic import MixtureDenoiser
from difflab.diffusion import Denoiser, NoiseSchedule, available_samplers, get_sampler
from difflab.diffusion.grid import Grid, karras_sigmas
from difflab.errors import UsageError
from difflab.nn import UNet
from difflab.nn.embeddings import LearnedTimeEmbedding


@pytest.fixture
def schedule():
    return NoiseSchedule.linear()


def test_fractional_timesteps_interpolate_log_sigma(schedule):
    table = schedule.sigmas
    torch.testing.assert_close(schedule.sigma_to_t(table[[0, 17, 999]]), torch.tensor([0.0, 17.0, 999.0],
                                                                                     dtype=torch.float64))
    midpoint = (table[17].log() + table[18].log()).div(2).exp()
    assert float(schedule.sigma_to_t(midpoint.reshape(1))) == pytest.approx(17.5, abs=1e-9)
    abar = schedule.t_to_abar(torch.tensor([17.0, 17.5]))
    assert float(abar[0]) == pytest.approx(float(schedule.alphas_cumprod[17]), rel=1e-12)
    assert float(abar[1]) == pytest.approx(1 / (1 + float(midpoint) ** 2), rel=1e-12)
    # beyond the table the timestep is clamped to [0, T - 1]
    assert schedule.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]
    # the forward process at a fractional t uses the interpolated level; at an integral one, the table
    alpha, sigma = schedule.alpha_sigma(torch.tensor([17.0, 17.5]), torch.zeros(2, 3))
    torch.testing.assert_close(alpha.flatten() ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(2, 1, dtype=torch.float64))


def test_learned_embedding_interpolates_its_rows():
    embedding = LearnedTimeEmbedding(8, num_timesteps=10)
    rows = embedding.table.weight
    out = embedding(torch.tensor([3.25, 9.0, 4.0]))
    torch.testing.assert_close(out[0], 0.75 * rows[3] + 0.25 * rows[4])
    torch.testing.assert_close(out[1], rows[9])
    torch.testing.assert_close(out[2], embedding(torch.tensor([4]))[0])


def test_default_ends_are_the_schedules_and_zero_terminal_snr_is_floored():
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    grid = Grid.sigma_schedule(schedule, "karras", 10)
    assert grid.sigmas[0] == pytest.approx((2.0**24 - 1) ** 0.5)  # alpha_bar floored at 2**-24, as diffusers
    assert grid.sigmas[-2] == pytest.approx(float(schedule.sigmas[0]))
    torch.testing.assert_close(torch.tensor(grid.sigmas[:-1], dtype=torch.float64),
                               karras_sigmas(10, grid.sigmas[-2], grid.sigmas[0]))
    sampler = get_sampler("euler", num_steps=10, sigma_schedule="karras")
    out = sampler.sample(MixtureDenoiser(schedule, "v_prediction").as_denoiser(), torch.randn(2, 30))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", available_samplers())
@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_every_sampler_runs_on_sigma_grids(schedule, name, kind):
    sampler = get_sampler(name, num_steps=8, sigma_schedule=kind, sigma_min=0.01, sigma_max=80.0)
    grid = sampler.grid(schedule)
    assert grid.sigmas[0] == pytest.approx(80.0) and grid.sigmas[-2] == pytest.approx(0.01)
    told = []

    def model_fn(x, t):
        told.append(t)
        return MixtureDenoiser(schedule)(x, t)

    events = []
    out = sampler.sample(Denoiser(model_fn, schedule), torch.randn(4, 6), callback=events.append,
                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert all(t.dtype == torch.float64 and 0 <= float(t.min()) <= float(t.max()) <= 999 for t in told)
    assert [e["t"] for e in events] == grid.timesteps.tolist()
    assert isinstance(events[0]["t"], float)


def test_churn(schedule):
    """s_churn = 0 is the deterministic sampler; churn adds noise, reproducibly from the generator."""
    denoiser = MixtureDenoiser(schedule).as_denoiser()
    x_T = torch.randn(4, 30, dtype=torch.float64)
    for name in ("euler", "heun"):
        plain = get_sampler(name, num_steps=10, sigma_schedule="karras").sample(denoiser, x_T)
        zero = get_sampler(name, num_steps=10, sigma_schedule="karras", s_churn=0.0).sample(
            denoiser, x_T, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(plain, zero, rtol=0, atol=0)
        churned = [get_sampler(name, num_steps=10, sigma_schedule="karras", s_churn=5.0).sample(
            denoiser, x_T, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
        torch.testing.assert_close(churned[0], churned[1], rtol=0, atol=0)
        assert (churned[0] - plain).abs().max() > 1e-3


def test_unet_with_learned_time_embedding_samples_on_a_karras_grid(schedule):
    torch.manual_seed(0)
    network = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), time_embedding="learned").eval()
    sampler = get_sampler("dpmpp_2m", num_steps=6, sigma_schedule="karras")
    with torch.no_grad():
        out = sampler.sample(Denoiser(lambda x, t: network(x, t), schedule), torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_errors_name_the_problem(schedule):
    with pytest.raises(UsageError, match="unknown sigma_schedule 'polyexponential'; valid: karras, exponential"):
        get_sampler("euler", sigma_schedule="polyexponential")
    with pytest.raises(UsageError, match="0 < sigma_min < sigma_max"):
        get_sampler("euler", sigma_schedule="karras", sigma_min=10.0, sigma_max=1.0).grid(schedule)
    with pytest.raises(UsageError, match="solver_type must be midpoint or heun"):
        get_sampler("dpmpp_2m_sde", solver_type="euler")
    with pytest.raises(ValueError, match="positive and decreasing"):
        Grid.from_sigmas(schedule, torch.tensor([1.0, 2.0]))
    assert math.isinf(get_sampler("heun").s_tmax)  # the yaml's .inf is a float infinity
