"""NoiseSchedule: closed forms of each named schedule and of the forward-process helpers."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.conf import options
from difflab.diffusion import NoiseSchedule


@pytest.fixture(params=options("schedule"))
def schedule(request):
    return NoiseSchedule.from_name(request.param)


def test_tables_are_float64_and_consistent(schedule):
    for table in (schedule.betas, schedule.alphas, schedule.alphas_cumprod, schedule.snr):
        assert table.dtype == torch.float64 and table.shape == (1000,)
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1 - schedule.betas, 0), atol=0, rtol=0)
    assert bool((schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all())  # noise only grows
    torch.testing.assert_close(schedule.snr, schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))


def test_named_constants():
    linear = NoiseSchedule.linear()
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    sd = NoiseSchedule.scaled_linear()
    assert sd.betas[0].item() == pytest.approx(0.00085) and sd.betas[-1].item() == pytest.approx(0.012)
    torch.testing.assert_close(sd.betas.sqrt().diff(), torch.full((999,), sd.betas.sqrt().diff()[0].item(),
                                                                    dtype=torch.float64))


def test_cosine_alpha_bar_closed_form():
    """Where beta is not capped, abar_t = f((t+1)/T) / f(0) with f(u) = cos^2((u + s)/(1 + s) pi/2)."""
    schedule = NoiseSchedule.cosine()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = torch.tensor([f((t + 1) / 1000) / f(0) for t in range(1000)], dtype=torch.float64)
    capped = schedule.betas >= 0.999
    assert capped.sum() == 1 and capped[-1]  # only the very last beta hits the cap
    torch.testing.assert_close(schedule.alphas_cumprod[:-1], expected[:-1], atol=1e-12, rtol=0)


def test_zero_terminal_snr():
    plain, rescaled = NoiseSchedule.scaled_linear(), NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1] == 0 and rescaled.snr[-1] == 0
    torch.testing.assert_close(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0])
    # sqrt(abar) is an affine map of the original one (Lin et al. 2023, Algorithm 1)
    a, b = plain.alphas_cumprod.sqrt(), rescaled.alphas_cumprod.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, (a - a[-1]) * slope, atol=1e-12, rtol=0)


def test_from_name_errors_list_valid_names():
    with pytest.raises(ValueError, match="valid: cosine, edm, flow, linear, scaled_linear, sigmoid"):
        NoiseSchedule.from_name("cosin")
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))


def test_from_name_equals_named_constructor():
    torch.testing.assert_close(NoiseSchedule.from_name("cosine", num_timesteps=50, s=0.01).betas,
                               NoiseSchedule.cosine(num_timesteps=50, s=0.01).betas)


def test_forward_process_and_conversions_round_trip(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)  # float64: 1 - abar cancels in float32 where sigma is small
    x_t = schedule.add_noise(x0, eps, t)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float())
    keep = t < 998  # near t = T-1 x0 from eps divides by a tiny alpha
    torch.testing.assert_close(schedule.x0_from_eps(x_t, eps, t)[keep], x0[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, x0, t), eps, atol=1e-3, rtol=0)
    v = schedule.velocity(x0, eps, t)
    torch.testing.assert_close(v, (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float())
    torch.testing.assert_close(schedule.x0_from_v(x_t, v, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(schedule.eps_from_v(x_t, v, t), eps, atol=1e-5, rtol=0)


def test_posterior_equals_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): product of two Gaussians in x_{t-1}."""
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 300, 700, 999])
    mean, variance = schedule.posterior(x0, x_t, t)
    alpha_t, beta_t = schedule.alphas[t].view(-1, 1), schedule.betas[t].view(-1, 1)
    abar_prev = schedule.alphas_cumprod[t - 1].view(-1, 1)
    precision = alpha_t / beta_t + 1 / (1 - abar_prev)
    expected_mean = (alpha_t.sqrt() * x_t / beta_t + abar_prev.sqrt() * x0 / (1 - abar_prev)) / precision
    torch.testing.assert_close(variance, 1 / precision, atol=1e-15, rtol=1e-10)
    torch.testing.assert_close(mean, expected_mean, atol=1e-12, rtol=1e-10)


def test_posterior_to_clean_level_is_x0(schedule):
    x0, x_t = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0, 40])
    mean, variance = schedule.posterior(x0, x_t, t, torch.tensor([-1, -1]))
    torch.testing.assert_close(mean, x0)
    assert bool((variance == 0).all())


def test_helpers_follow_the_tensor_device_and_any_rank(schedule):
    x0 = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([3, 4, 5])
    assert schedule.add_noise(x0, torch.zeros_like(x0), t).shape == (3, 5)
    assert schedule.add_noise(torch.ones(3), torch.zeros(3), t).shape == (3,)
