"""data=gmm: images of i.i.d. Gaussian-mixture pixels, with the exact posterior mean E[x0 | x_t]."""

from __future__ import annotations

import math

import pytest
import torch

from analytic import ks_distance
from configs import make_cfg
from difflab.cli.train import run
from difflab.data.gmm import GaussianMixture, gmm
from difflab.errors import UsageError


def test_the_pixels_follow_the_mixture_within_the_dkw_bound():
    dataset = gmm(n=512, image_size=8, weights=(0.2, 0.8), means=(-2.0, 0.5), stds=(0.4, 0.3), seed=3)
    pixels = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    assert pixels.shape == (512, 1, 8, 8) and dataset[0]["caption"] == "" and dataset[0]["label"] == -1
    n = pixels.numel()
    bound = math.sqrt(math.log(2 / 1e-3) / (2 * n))  # DKW: exceeded with probability 1e-3 under the true law
    assert ks_distance(pixels, GaussianMixture((0.2, 0.8), (-2.0, 0.5), (0.4, 0.3)).cdf) < bound
    assert ks_distance(pixels, GaussianMixture((0.5, 0.5), (-2.0, 0.5), (0.4, 0.3)).cdf) > 10 * bound
    assert torch.equal(gmm(n=4, seed=3)[2]["image"], gmm(n=4, seed=3)[2]["image"])  # fixed by the seed


@pytest.mark.parametrize("alpha,sigma", [(0.99, 0.14), (0.6, 0.8), (0.05, 0.9987)])
def test_the_posterior_mean_equals_numerical_integration(alpha, sigma):
    mixture = GaussianMixture((0.3, 0.7), (-1.5, 1.0), (0.3, 0.5))
    x0 = torch.linspace(-6, 6, 200_001, dtype=torch.float64)
    prior = (mixture.weights / (mixture.stds * math.sqrt(2 * math.pi)) *
             torch.exp(-0.5 * ((x0[:, None] - mixture.means) / mixture.stds) ** 2)).sum(-1)
    x_t = torch.tensor([-2.0, -0.3, 0.0, 0.7, 2.5], dtype=torch.float64)
    likelihood = torch.exp(-0.5 * ((x_t[:, None] - alpha * x0) / sigma) ** 2)  # (5, grid)
    expected = torch.trapezoid(x0 * prior * likelihood, x0, dim=-1) / torch.trapezoid(prior * likelihood, x0, dim=-1)
    torch.testing.assert_close(mixture.posterior_mean(x_t, alpha, sigma), expected, atol=1e-8, rtol=1e-8)


def test_a_bad_mixture_is_refused():
    with pytest.raises(UsageError, match="positive weights"):
        GaussianMixture((0.5, 0.5), (0.0,), (1.0, 1.0))


def test_a_network_trains_on_it(tmp_path):
    trainer = run(make_cfg(tmp_path, "data=gmm", "conditioning=none", "data.dataset.n=256", "trainer.max_steps=3"))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
