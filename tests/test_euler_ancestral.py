"""Euler ancestral: equal to diffusers' EulerAncestralDiscreteScheduler given the same noise draws, equal to Euler
at eta = 0, and it recovers the data distribution of the closed-form mixture."""

from __future__ import annotations

import math

import pytest
import torch

from analytic import MixtureDenoiser, ks_distance
from difflab.diffusion import NoiseSchedule, get_sampler
from difflab.diffusion.samplers.euler_ancestral import EulerAncestralSampler, ancestral_step


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_equals_diffusers_with_the_same_noise(prediction_type):
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule.scaled_linear()
    model = MixtureDenoiser(schedule, prediction_type)
    scheduler = diffusers.EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012, prediction_type=prediction_type,
                                                          timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x_T * (scheduler.sigmas[0] ** 2 + 1) ** 0.5  # the VP-consistent start (as the Euler golden test)
    generator = torch.Generator().manual_seed(1)  # diffusers draws its noise in float32 on the CPU, as we do
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(x, t), t.long().expand(x.shape[0]))
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    sampler = get_sampler("euler_ancestral", num_steps=10, timestep_spacing="trailing")
    assert isinstance(sampler, EulerAncestralSampler)
    ours = sampler.sample(model.as_denoiser(), x_T, generator=torch.Generator().manual_seed(1))
    assert (ours - x).abs().max() <= 1e-4


def test_eta_zero_is_euler_and_the_step_splits_sigma():
    schedule = NoiseSchedule.cosine()
    model = MixtureDenoiser(schedule, "v_prediction").as_denoiser()
    x_T = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(get_sampler("euler_ancestral", num_steps=20, eta=0.0).sample(model, x_T),
                               get_sampler("euler", num_steps=20).sample(model, x_T), atol=1e-12, rtol=0)
    down, up = ancestral_step(2.0, 1.0)
    assert math.isclose(down**2 + up**2, 1.0) and math.isclose(up, (1 * (4 - 1) / 4) ** 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("schedule_name,prediction_type", [("linear", "epsilon"), ("cosine", "v_prediction")])
def test_recovers_the_mixture_distribution(schedule_name, prediction_type):
    """As tests/test_sampler_distribution.py: x_T from the exact marginal, the exact denoiser, KS distance within
    the DKW sampling bound (delta = 1e-6) plus 0.0065 for discretisation; a wrong mixture is told apart."""
    n = 100_000
    tolerance = math.sqrt(math.log(2 / 1e-6) / (2 * n)) + 0.0065
    schedule = NoiseSchedule.from_name(schedule_name)
    sampler = get_sampler("euler_ancestral", num_steps=250)
    truth = MixtureDenoiser(schedule, prediction_type)
    for model, ok in ((truth, True), (MixtureDenoiser(schedule, prediction_type, weights=(0.35, 0.65)), False)):
        g = torch.Generator().manual_seed(0)
        x_T = model.marginal_sample(n, int(sampler.grid(schedule).timesteps[0]), g).reshape(200, 500).float()
        distance = ks_distance(sampler.sample(model.as_denoiser(), x_T, generator=g), truth.cdf)
        assert (distance <= tolerance) == ok, distance
