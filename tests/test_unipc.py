"""UniPC against diffusers' UniPCMultistepScheduler on the same denoiser and noise, as shipped and exactly."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from analytic import MixtureDenoiser
from difflab.diffusion import NoiseSchedule, get_sampler
from test_golden_diffusers import DIFFUSERS_SCHEDULES, run_scheduler, use_float64_tables, x_T

diffusers = pytest.importorskip("diffusers")


def ours_and_theirs(sampler, scheduler, model_fn, x, steps, bh1):
    """Both results; with bh1 the state before the last step, where diffusers computes -inf * 0 (B(h) = -h at
    sigma = 0) and returns NaN while that step is DDIM to x0 whatever B(h) is."""
    if not bh1:
        return sampler.sample(model_fn.as_denoiser(), x), run_scheduler(scheduler, model_fn, x)
    states = {}
    sampler.sample(model_fn.as_denoiser(), x, callback=lambda info: states.__setitem__(info["i"], info["x"]))
    for t in scheduler.timesteps[:-1]:
        x = scheduler.step(model_fn(x, t.long().expand(x.shape[0])), t, x).prev_sample
    return states[steps - 2].to(x.dtype), x


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order,solver_type", [(2, "bh2"), (3, "bh2"), (2, "bh1"), (1, "bh2")])
def test_unipc_equals_diffusers(name, prediction_type, order, solver_type):
    schedule = NoiseSchedule.from_name(name)
    model_fn = MixtureDenoiser(schedule, prediction_type)
    sampler = get_sampler("unipc", num_steps=12, solver_order=order, solver_type=solver_type)

    scheduler = diffusers.UniPCMultistepScheduler(**DIFFUSERS_SCHEDULES[name], prediction_type=prediction_type,
                                                  solver_order=order, solver_type=solver_type)
    bh1 = solver_type == "bh1"
    if not (name == "cosine" and prediction_type == "epsilon"):  # float32-ill-conditioned at t = 999
        scheduler.set_timesteps(12)
        ours, expected = ours_and_theirs(sampler, scheduler, model_fn, x_T(), 12, bh1)
        assert (ours - expected).abs().max() <= 1e-4

    # exactly: diffusers fed float64 tables (its float32 casts made float64)
    use_float64_tables(scheduler, schedule, 12)
    with mock.patch.object(torch, "float32", torch.float64):
        ours, expected = ours_and_theirs(sampler, scheduler, model_fn, x_T(torch.float64), 12, bh1)
    assert (ours - expected).abs().max() <= 1e-9


def test_disabled_corrector_steps_equal_diffusers():
    schedule = NoiseSchedule.linear()
    model_fn = MixtureDenoiser(schedule, "epsilon")
    scheduler = diffusers.UniPCMultistepScheduler(**DIFFUSERS_SCHEDULES["linear"], disable_corrector=[0, 3])
    scheduler.set_timesteps(10)
    expected = run_scheduler(scheduler, model_fn, x_T())
    ours = get_sampler("unipc", num_steps=10, disable_corrector=[0, 3]).sample(model_fn.as_denoiser(), x_T())
    assert (ours - expected).abs().max() <= 1e-4
    plain = get_sampler("unipc", num_steps=10).sample(model_fn.as_denoiser(), x_T())
    assert (plain - ours).abs().max() > 1e-4  # the corrector changes the result


def test_the_corrector_improves_on_the_predictor_alone():
    """At few steps the corrected solver lands nearer a 200-step reference than UniP alone (Zhao et al. 2023)."""
    schedule = NoiseSchedule.cosine()
    model_fn = MixtureDenoiser(schedule, "v_prediction")
    reference = get_sampler("unipc", num_steps=200).sample(model_fn.as_denoiser(), x_T(torch.float64))
    with_c = get_sampler("unipc", num_steps=6).sample(model_fn.as_denoiser(), x_T(torch.float64))
    without = get_sampler("unipc", num_steps=6, disable_corrector=list(range(6))).sample(
        model_fn.as_denoiser(), x_T(torch.float64))
    assert (with_c - reference).abs().max() < 0.5 * (without - reference).abs().max()
