"""Samplers driven by the exact denoiser of a known data distribution recover that distribution.

Data: i.i.d. elements from a two-component Gaussian mixture, whose optimal eps / x0 / v predictions are
closed-form (tests/analytic.py). x_T is drawn from the exact marginal q(x_{t_0}), so what remains is the
sampler's own error. We compare the empirical CDF of n samples to the true CDF (Kolmogorov-Smirnov
distance D_n) with a tolerance made of two parts:

* sampling error: by the Dvoretzky-Kiefer-Wolfowitz inequality P(D_n > eps) <= 2 exp(-2 n eps^2), so with
  eps_stat = sqrt(ln(2 / delta) / (2 n)) a correct sampler fails with probability <= delta = 1e-6;
* discretisation error: the step counts below were chosen so that the measured distance at n = 4e5
  (dominated by discretisation) is <= 0.0065 for every sampler, schedule and prediction type; we allow
  eps_disc = 0.0065.

A denoiser for a slightly different mixture (weights 0.35 / 0.65 instead of 0.3 / 0.7) must fail the
same check, which shows the test can tell a wrong sampler from a right one.
"""

from __future__ import annotations

import math

import pytest
import torch

from analytic import MixtureDenoiser, ks_distance
from difflab.diffusion import NoiseSchedule, get_sampler

N_SAMPLES = 100_000
DELTA = 1e-6
EPS_STAT = math.sqrt(math.log(2 / DELTA) / (2 * N_SAMPLES))  # 0.0085
EPS_DISC = 0.0065
TOLERANCE = EPS_STAT + EPS_DISC

SAMPLERS = [
    ("ddpm", dict(num_steps=1000)),
    ("ddim", dict(num_steps=100)),
    ("ddim", dict(num_steps=250, eta=1.0)),
    ("dpmpp_2m", dict(num_steps=50)),
    ("euler", dict(num_steps=100)),
    ("heun", dict(num_steps=25)),
    # sigma grids spend their steps at small sigma (rho = 7 was tuned for images with sigma_data = 0.5): on this
    # mixture they need more steps than the spaced grids for the same discretisation error
    ("heun", dict(num_steps=90, sigma_schedule="karras")),
    ("heun", dict(num_steps=100, sigma_schedule="karras", s_churn=20.0)),
    ("dpmpp_2m", dict(num_steps=100, sigma_schedule="karras")),
    ("dpmpp_2m", dict(num_steps=50, sigma_schedule="exponential")),
    ("dpmpp_2m_sde", dict(num_steps=250)),
    ("dpmpp_2m_sde", dict(num_steps=150, sigma_schedule="karras")),
    ("unipc", dict(num_steps=50)),
    ("unipc", dict(num_steps=50, solver_order=3)),
]


def run(name, kwargs, schedule, denoiser, prediction_type, seed=0):
    sampler = get_sampler(name, **kwargs)
    g = torch.Generator().manual_seed(seed)
    x_T = denoiser.marginal_sample(N_SAMPLES, int(sampler.grid(schedule).timesteps[0]), g).reshape(200, 500).float()
    return sampler.sample(denoiser.as_denoiser(), x_T, generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", SAMPLERS, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("schedule_name,prediction_type", [("linear", "epsilon"), ("cosine", "v_prediction"),
                                                           ("scaled_linear", "sample")])
def test_sampler_recovers_data_distribution(name, kwargs, schedule_name, prediction_type):
    schedule = NoiseSchedule.from_name(schedule_name)
    denoiser = MixtureDenoiser(schedule, prediction_type)
    samples = run(name, kwargs, schedule, denoiser, prediction_type)
    assert ks_distance(samples, denoiser.cdf) <= TOLERANCE


@pytest.mark.parametrize("name,kwargs", [("ddim", dict(num_steps=100)), ("dpmpp_2m", dict(num_steps=50))])
def test_wrong_denoiser_is_detected(name, kwargs):
    schedule = NoiseSchedule.linear()
    truth = MixtureDenoiser(schedule, "epsilon")
    wrong = MixtureDenoiser(schedule, "epsilon", weights=(0.35, 0.65))
    samples = run(name, kwargs, schedule, wrong, "epsilon")
    assert ks_distance(samples, truth.cdf) > TOLERANCE
