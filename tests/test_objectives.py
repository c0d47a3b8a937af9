"""Training objective: targets, Min-SNR weighting in each output space, and the loss itself."""

from __future__ import annotations

import pytest
import torch

from difflab.diffusion import (
    DiffusionLoss,
    MinSNRWeighting,
    NoiseSchedule,
    UniformTimesteps,
    UniformWeighting,
    get_prediction,
)

PREDICTIONS = ["epsilon", "sample", "v_prediction"]


@pytest.fixture
def schedule():
    return NoiseSchedule.cosine()


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 998, n).long()
    return x0, noise, t


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_perfect_model_has_zero_loss(schedule, prediction_type):
    x0, noise, t = batch()
    prediction = get_prediction(prediction_type)

    def oracle(x_t, t_):
        alpha, sigma = schedule.alpha_sigma(t_, x_t)
        return prediction.target(x0, noise, alpha, sigma)

    out = DiffusionLoss(prediction_type, MinSNRWeighting())(oracle, x0, schedule, t=t, noise=noise)
    assert out.loss.item() < 1e-20 and out.per_sample.shape == (16,)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_min_snr_equals_min_snr_gamma_times_x0_error(schedule, prediction_type):
    """Hang et al. 2023: the loss is min(SNR, gamma) ||x0 - x0_hat||^2 whatever the network predicts."""
    x0, noise, t = batch()
    g = torch.Generator().manual_seed(7)
    perturbation = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    prediction = get_prediction(prediction_type)
    seen = {}

    def model(x_t, t_):
        alpha, sigma = schedule.alpha_sigma(t_, x_t)
        seen["x_t"] = x_t
        return prediction.target(x0, noise, alpha, sigma) + 0.1 * perturbation

    out = DiffusionLoss(prediction_type, MinSNRWeighting(gamma=5.0))(model, x0, schedule, t=t, noise=noise)
    alpha, sigma = schedule.alpha_sigma(t, x0)
    x0_hat = prediction.to_x0(model(seen["x_t"], t), seen["x_t"], alpha, sigma)
    snr = schedule.snr[t]
    expected = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.per_sample.double(), expected, rtol=1e-5, atol=1e-10)


def test_min_snr_epsilon_is_finite_at_zero_snr():
    weights = MinSNRWeighting()(torch.tensor([0.0, 1.0, 5.0, 100.0]), get_prediction("epsilon"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 1.0, 0.05]))


def test_uniform_weighting_is_plain_mse(schedule):
    x0, noise, t = batch()
    model = lambda x_t, t_: torch.zeros_like(x_t)
    out = DiffusionLoss("epsilon", UniformWeighting())(model, x0, schedule, t=t, noise=noise)
    torch.testing.assert_close(out.per_sample.double(), noise.pow(2).flatten(1).mean(1), rtol=1e-6, atol=0)


def test_loss_draws_t_and_noise_and_backpropagates(schedule):
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x0 = torch.randn(64, 1, 8, 8)
    out = DiffusionLoss()(lambda x, t: net(x), x0, schedule, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert net.weight.grad is not None and out.t.min() >= 0 and out.t.max() < 1000
    assert out.t.unique().numel() > 50  # 64 draws from 1000 values are nearly all distinct


def test_uniform_timesteps_are_uniform():
    """Chi-square goodness of fit over 10 bins; the threshold is the 1e-6 upper quantile of chi2(9)."""
    t = UniformTimesteps()(200_000, 1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).double()
    chi2 = ((counts - 20_000) ** 2 / 20_000).sum().item()
    assert chi2 < 48.3


def test_unknown_prediction_type_lists_valid():
    with pytest.raises(ValueError, match="valid: edm, epsilon, flow, sample, v_prediction"):
        DiffusionLoss("eps")
