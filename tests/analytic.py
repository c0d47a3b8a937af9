"""A denoiser whose optimal prediction is known in closed form: data = i.i.d. 1-D Gaussian mixture per element.

For x0 ~ sum_k w_k N(mu_k, s_k^2) and x_t = alpha x0 + sigma eps, the posterior over components is
r_k ∝ w_k N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2) and E[x0 | x_t] = sum_k r_k (mu_k + alpha s_k^2
(x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)); eps_hat and v_hat follow from x0_hat exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.diffusion import Denoiser, NoiseSchedule, get_prediction


class MixtureDenoiser:
    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 weights=(0.3, 0.7), means=(-1.5, 1.0), stds=(0.3, 0.5)):
        self.schedule = schedule
        self.prediction = get_prediction(prediction_type)
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.means = torch.tensor(means, dtype=torch.float64)
        self.stds = torch.tensor(stds, dtype=torch.float64)
        self.calls = 0

    def x0_hat(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        x = x_t.double().unsqueeze(-1)
        alpha, sigma = alpha.unsqueeze(-1), sigma.unsqueeze(-1)
        var = alpha**2 * self.stds**2 + sigma**2
        log_r = self.weights.log() - 0.5 * var.log() - 0.5 * (x - alpha * self.means) ** 2 / var
        r = torch.softmax(log_r, dim=-1)
        x0_k = self.means + alpha * self.stds**2 * (x - alpha * self.means) / var
        return (r * x0_k).sum(-1)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        x0 = self.x0_hat(x_t, alpha, sigma)
        eps = (x_t.double() - alpha * x0) / sigma
        return self.prediction.target(x0, eps, alpha, sigma).to(x_t.dtype)

    def as_denoiser(self) -> Denoiser:
        """This model behind the ``Denoiser`` interface the samplers take."""
        return Denoiser(self, self.schedule, self.prediction)

    def sample_data(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k] * torch.randn(n, generator=generator, dtype=torch.float64)

    def marginal_sample(self, n: int, t: int, generator: torch.Generator) -> Tensor:
        """Exact draws of x_t for integer t (q(x_t) is again a Gaussian mixture)."""
        abar = float(self.schedule.alphas_cumprod[t])
        x0 = self.sample_data(n, generator)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)

    def cdf(self, x: Tensor) -> Tensor:
        z = (x.double().unsqueeze(-1) - self.means) / self.stds
        return (self.weights * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)


def ks_distance(samples: Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``samples`` and ``cdf``."""
    x, _ = samples.flatten().double().sort()
    n = x.numel()
    F = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - F).max().item(), (F - (i - 1) / n).max().item())
