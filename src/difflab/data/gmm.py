"""Images whose pixels are i.i.d. draws of a 1-D Gaussian mixture: data whose optimal denoiser is known in closed
form, so a network's loss can be compared with the Bayes-optimal one and a sampler's output with the true law.

For x0 ~ sum_k w_k N(mu_k, s_k^2) and x_t = alpha x0 + sigma eps, the posterior over components is
r_k ∝ w_k N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2) and E[x0 | x_t] = sum_k r_k (mu_k + alpha s_k^2
(x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.data.datasets import LabelledImages
from difflab.data.layout import NO_LABEL
from difflab.errors import UsageError


class GaussianMixture:
    """A 1-D Gaussian mixture, in float64: draws, its CDF and the exact posterior mean under Gaussian noise."""

    def __init__(self, weights: Sequence[float] = (0.3, 0.7), means: Sequence[float] = (-1.5, 1.0),
                 stds: Sequence[float] = (0.3, 0.5)):
        if not len(weights) == len(means) == len(stds) or min(weights) <= 0 or min(stds) <= 0:
            raise UsageError(f"a Gaussian mixture needs as many positive weights {list(weights)}, means "
                             f"{list(means)} and positive stds {list(stds)}")
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.means = torch.tensor(means, dtype=torch.float64)
        self.stds = torch.tensor(stds, dtype=torch.float64)

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """i.i.d. draws of the given shape (float64)."""
        n = math.prod(shape)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        draws = self.means[k] + self.stds[k] * torch.randn(n, generator=generator, dtype=torch.float64)
        return draws.reshape(tuple(shape))

    def posterior_mean(self, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """E[x0 | x_t] for x_t = alpha x0 + sigma eps, elementwise (float64; alpha, sigma broadcast with x_t)."""
        x = x_t.double().unsqueeze(-1)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).unsqueeze(-1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).unsqueeze(-1)
        var = alpha**2 * self.stds**2 + sigma**2
        log_r = self.weights.log() - 0.5 * var.log() - 0.5 * (x - alpha * self.means) ** 2 / var
        x0_k = self.means + alpha * self.stds**2 * (x - alpha * self.means) / var
        return (torch.softmax(log_r, dim=-1) * x0_k).sum(-1)

    def cdf(self, x: Tensor) -> Tensor:
        z = (x.double().unsqueeze(-1) - self.means) / self.stds
        return (self.weights * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)


def _no_caption(label: int) -> str:
    return ""


def gmm(n: int = 4096, image_size: int = 8, channels: int = 1, weights: Sequence[float] = (0.3, 0.7),
        means: Sequence[float] = (-1.5, 1.0), stds: Sequence[float] = (0.3, 0.5), seed: int = 0) -> LabelledImages:
    """``n`` unlabelled images (channels, image_size, image_size) of i.i.d. mixture pixels, fixed by ``seed``
    (``data=gmm``; train it with ``conditioning=none``). The pixels are not in [-1, 1]: the mixture is the data."""
    mixture = GaussianMixture(weights, means, stds)
    images = mixture.sample((n, channels, image_size, image_size), torch.Generator().manual_seed(seed)).float()
    return LabelledImages(images, torch.full((n,), NO_LABEL), caption_fn=_no_caption, name="gmm")
