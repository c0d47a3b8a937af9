"""The loss group: each distance against its closed form, offset noise and input perturbation as their papers
define them (what builds x_t, what the target is), validation without them, and loss=... from the command line."""

from __future__ import annotations

import math

import pytest
import torch

from configs import make_cfg
from difflab.cli.train import run
from difflab.diffusion import (
    DiffusionLoss,
    HuberLoss,
    L1Loss,
    L2Loss,
    NoiseSchedule,
    PseudoHuberLoss,
    UniformWeighting,
)
from difflab.errors import UsageError


@pytest.fixture
def errors():
    g = torch.Generator().manual_seed(0)
    output = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    target = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64) * torch.logspace(-3, 0, 6)[:, None, None, None]
    return output, target, (output - target).flatten(1)


def test_l2_and_l1_are_the_mean_squared_and_absolute_error(errors):
    output, target, e = errors
    torch.testing.assert_close(L2Loss()(output, target), e.pow(2).mean(1).float())
    torch.testing.assert_close(L1Loss()(output, target), e.abs().mean(1).float())


@pytest.mark.parametrize("delta", [0.05, 1.0])
def test_huber_is_quadratic_below_delta_and_linear_above(errors, delta):
    output, target, e = errors
    a = e.abs()
    closed_form = torch.where(a <= delta, 0.5 * e**2, delta * (a - 0.5 * delta)).mean(1)
    assert (a <= delta).any() and (a > delta).any()
    torch.testing.assert_close(HuberLoss(delta=delta)(output, target), closed_form.float())


def test_pseudo_huber_is_song_and_dhariwals_metric_per_element(errors):
    """sqrt(||e||^2 + c_p^2) - c_p with c_p = 0.00054 sqrt(D) (Song & Dhariwal 2023, Sec. 3.3), over sqrt(D)."""
    output, target, e = errors
    dim = e.shape[1]
    c_p = 0.00054 * math.sqrt(dim)
    paper = ((e.pow(2).sum(1) + c_p**2).sqrt() - c_p) / math.sqrt(dim)
    torch.testing.assert_close(PseudoHuberLoss()(output, target), paper.float(), rtol=1e-5, atol=1e-9)
    # L2-like far below c, the RMS error (L1 in the norm) far above
    small = torch.full((1, 8), 1e-6)
    torch.testing.assert_close(PseudoHuberLoss(c=1.0)(small, torch.zeros(1, 8)), torch.tensor([0.5e-12]))
    large = torch.full((1, 8), 3.0)
    torch.testing.assert_close(PseudoHuberLoss(c=1e-6)(large, torch.zeros(1, 8)), torch.tensor([3.0]))


class Recorder:
    """An epsilon network that records its input and answers ``answer(x_t)``."""

    def __init__(self, answer):
        self.answer, self.inputs = answer, []

    def __call__(self, x_t, t):
        self.inputs.append(x_t)
        return self.answer(x_t)


def setup(loss, n=512):
    schedule = NoiseSchedule.linear()
    x0 = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.full((n,), 500)
    alpha, sigma = (c.float() for c in schedule.alpha_sigma(t, x0))
    return DiffusionLoss("epsilon", UniformWeighting(), loss=loss), schedule, x0, t, alpha, sigma


def test_offset_noise_is_a_per_channel_constant_in_the_input_and_the_target():
    diffusion_loss, schedule, x0, t, alpha, sigma = setup(L2Loss(offset_noise=0.5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    zero = Recorder(torch.zeros_like)
    out = diffusion_loss(zero, x0, schedule, t=t, noise=noise, generator=torch.Generator().manual_seed(3))
    used = (zero.inputs[0] - alpha * x0) / sigma  # the noise that built x_t
    offset = used - noise
    assert offset.std(dim=(2, 3)).max() < 1e-5  # constant over pixels ...
    assert abs(float(offset.mean(dim=(2, 3)).std()) - 0.5) < 0.05  # ... N(0, offset^2) per sample and channel
    # the target is that same noise: a network answering zero pays exactly its mean square
    torch.testing.assert_close(out.per_sample, used.pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)


def test_input_perturbation_builds_x_t_from_perturbed_noise_and_keeps_the_target():
    diffusion_loss, schedule, x0, t, alpha, sigma = setup(L2Loss(input_perturbation=0.1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    # a network that knows the unperturbed eps pays nothing: the target is eps, not the perturbed noise
    oracle = Recorder(lambda x_t: noise)
    out = diffusion_loss(oracle, x0, schedule, t=t, noise=noise, generator=torch.Generator().manual_seed(3))
    assert float(out.loss) == 0.0
    perturbation = (oracle.inputs[0] - alpha * x0) / sigma - noise
    assert abs(float(perturbation.std()) - 0.1) < 0.005 and abs(float(perturbation.mean())) < 0.005
    # and one that reads the noise off its input (x_t, x0 known) pays gamma^2 per element
    reader = Recorder(lambda x_t: (x_t - alpha * x0) / sigma)
    out = diffusion_loss(reader, x0, schedule, t=t, noise=noise, generator=torch.Generator().manual_seed(3))
    assert abs(float(out.loss) - 0.01) < 0.001


@pytest.mark.parametrize("loss", [L2Loss(offset_noise=0.1, input_perturbation=0.1), HuberLoss(offset_noise=0.3)])
def test_validation_uses_the_plain_forward_process(loss):
    diffusion_loss, schedule, x0, t, alpha, sigma = setup(loss)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    recorder = Recorder(torch.zeros_like)
    diffusion_loss(recorder, x0, schedule, t=t, noise=noise, train=False)
    torch.testing.assert_close(recorder.inputs[0], schedule.add_noise(x0, noise, t))


@pytest.mark.parametrize("make", [lambda: L2Loss(offset_noise=-0.1), lambda: HuberLoss(delta=0),
                                  lambda: PseudoHuberLoss(c=-1.0), lambda: L1Loss(input_perturbation=-1)])
def test_bad_values_are_refused(make):
    with pytest.raises(UsageError, match="loss\\."):
        make()


def test_loss_group_from_the_command_line_trains(tmp_path):
    trainer = run(make_cfg(tmp_path, "loss=pseudo_huber", "loss.offset_noise=0.1", "loss.input_perturbation=0.1"))
    loss_fn = trainer.lightning_module.loss.loss_fn
    assert isinstance(loss_fn, PseudoHuberLoss)
    assert (loss_fn.offset_noise, loss_fn.input_perturbation, loss_fn.c) == (0.1, 0.1, 0.00054)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
