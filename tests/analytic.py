"""A denoiser whose optimal prediction is known in closed form: data = i.i.d. 1-D Gaussian mixture per element
(difflab.data.gmm.GaussianMixture gives E[x0 | x_t]); eps_hat and v_hat follow from x0_hat exactly."""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.data.gmm import GaussianMixture
from difflab.diffusion import Denoiser, NoiseSchedule, get_prediction


class MixtureDenoiser:
    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 weights=(0.3, 0.7), means=(-1.5, 1.0), stds=(0.3, 0.5)):
        self.schedule = schedule
        self.prediction = get_prediction(prediction_type)
        self.mixture = GaussianMixture(weights, means, stds)
        self.weights, self.means, self.stds = self.mixture.weights, self.mixture.means, self.mixture.stds
        self.calls = 0

    def x0_hat(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return self.mixture.posterior_mean(x_t, alpha, sigma)

    def __call__(self, x_in: Tensor, t: Tensor) -> Tensor:
        """The exact output at the network's input (x_t, scaled as the prediction scales it: EDM's c_in)."""
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(t, x_in)
        x_t = x_in.double() / self.prediction.scale_input(torch.ones_like(alpha), alpha, sigma)
        x0 = self.x0_hat(x_t, alpha, sigma)
        eps = (x_t.double() - alpha * x0) / sigma
        return self.prediction.target(x0, eps, alpha, sigma).to(x_in.dtype)

    def as_denoiser(self) -> Denoiser:
        """This model behind the ``Denoiser`` interface the samplers take."""
        return Denoiser(self, self.schedule, self.prediction)

    def sample_data(self, n: int, generator: torch.Generator) -> Tensor:
        return self.mixture.sample((n,), generator)

    def marginal_sample(self, n: int, t: int, generator: torch.Generator) -> Tensor:
        """Exact draws of x_t for integer t (q(x_t) is again a Gaussian mixture)."""
        abar = float(self.schedule.alphas_cumprod[t])
        x0 = self.sample_data(n, generator)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)

    def cdf(self, x: Tensor) -> Tensor:
        return self.mixture.cdf(x)


def ks_distance(samples: Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``samples`` and ``cdf``."""
    x, _ = samples.flatten().double().sort()
    n = x.numel()
    F = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - F).max().item(), (F - (i - 1) / n).max().item())
