"""Solvers of the probability-flow ODE in the sigma parameterisation (Karras et al. 2022): Euler and Heun.

Karras et al. 2022, Eq. 4 with s(t) = 1: in x_ve = x_t / alpha, dx_ve / dsigma = (x_ve - x0_hat) / sigma,
sigma = sqrt((1 - abar) / abar). The steps take and return the variance-preserving x_t like every sampler
(x_ve = x_t / alpha at each end), so they run inside any loop. alpha_bar is floored at 2**-24 so that a
zero-terminal-SNR grid has a finite sigma_max (as diffusers does). Both take Algorithm 2's churn: before the
step, noise raises sigma_i to sigma_hat = (1 + gamma) sigma_i, and the step starts from there.
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.diffusion.grid import Grid
from difflab.diffusion.noise import randn_like
from difflab.diffusion.samplers.base import Denoise, Sampler
from difflab.diffusion.schedules import MIN_ALPHA_BAR


class KarrasSampler(Sampler):
    """Base of the samplers that step in sigma."""

    default_spacing = "linspace"  # diffusers' Euler/Heun default
    min_alpha_bar = MIN_ALPHA_BAR

    @staticmethod
    def from_pure_noise(denoise: Denoise, x: Tensor, grid: Grid, i: int, sigma_down: float) -> tuple[Tensor, Tensor]:
        """(x_ve at sigma_down, x0_hat) from a point of infinite sigma (alpha_bar = 0, a flow grid's start): the limit
        of the step as sigma -> inf, x0_hat + sigma_down eps_hat (DDIM's step; x_ve itself is not finite there)."""
        x0, eps = denoise(x, i)
        return x0 + sigma_down * eps, x0

    @staticmethod
    def derivative(denoise: Denoise, x_ve: Tensor, grid: Grid, i: int,
                   sigma: float | None = None) -> tuple[Tensor, Tensor]:
        """(dx_ve/dsigma, x0_hat) at grid point i, or at ``sigma`` off the grid; the network sees the VP-scaled
        x_t = x_ve / sqrt(1 + sigma^2)."""
        if sigma is None:
            x0, _ = denoise(x_ve * grid.alphas_cumprod[i] ** 0.5, i)
            return (x_ve - x0) / grid.sigmas[i], x0
        x0, _ = denoise(x_ve / (1 + sigma**2) ** 0.5, i, sigma=sigma)
        return (x_ve - x0) / sigma, x0


class ChurnSampler(KarrasSampler):
    """Euler or Heun with Karras et al. 2022's churn (Algorithm 2): gamma = min(s_churn / N, sqrt(2) - 1) for
    s_tmin <= sigma_i <= s_tmax, else 0; s_churn = 0 (the default) is Algorithm 1's deterministic sampler."""

    def __init__(self, num_steps: int, *, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, **kwargs):
        super().__init__(num_steps, **kwargs)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def churn(self, x_ve: Tensor, grid: Grid, i: int, generator) -> tuple[Tensor, float | None]:
        """(x_ve raised to sigma_hat, sigma_hat), or (x_ve, None) where gamma = 0 and the step starts on the grid."""
        sigma = grid.sigmas[i]
        gamma = min(self.s_churn / len(grid), 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
        if gamma <= 0:
            return x_ve, None
        sigma_hat = sigma * (gamma + 1)
        noise = randn_like(x_ve, generator) * self.s_noise
        return x_ve + noise * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


class EulerSampler(ChurnSampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with a first-order step).

    With exact arithmetic, no churn and no clipping this is DDIM with eta = 0 on the same grid (Karras et al.
    2022, Sec. 3 and Appendix B).
    """

    name = "euler"

    def __init__(self, num_steps: int = 50, **kwargs):
        super().__init__(num_steps, **kwargs)

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        if math.isinf(grid.sigmas[i]):
            x_ve, x0 = self.from_pure_noise(denoise, x, grid, i, grid.sigmas[i + 1])
            return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0
        x_ve, sigma_hat = self.churn(x / grid.alphas_cumprod[i] ** 0.5, grid, i, generator)
        d, x0 = self.derivative(denoise, x_ve, grid, i, sigma_hat)
        x_ve = x_ve + d * (grid.sigmas[i + 1] - (sigma_hat or grid.sigmas[i]))
        return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0


class HeunSampler(ChurnSampler):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithms 1 and 2).

    Each step takes an Euler step, evaluates the slope at its end and averages the two; the last step, to
    sigma = 0, is an Euler step. N steps cost 2N - 1 network evaluations.

    Deviation, for a reason: a step whose sigma falls by more than ``max_sigma_ratio`` is also an Euler
    step. The trapezoid rule's error grows with the step's length in sigma, and Karras et al. designed it
    for sigma_max = 80; the cosine schedule's t = T-1 has sigma = 2e4 and its first step would then be
    multiplied by a change of x0_hat over that step (the output is garbage, see the distribution tests).
    Euler is near exact there, where x0_hat is still the data mean.
    """

    name = "heun"

    def __init__(self, num_steps: int = 25, *, max_sigma_ratio: float = 100.0, **kwargs):
        super().__init__(num_steps, **kwargs)
        self.max_sigma_ratio = max_sigma_ratio

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        sigmas = grid.sigmas
        if math.isinf(sigmas[i]):  # an Euler step, as every step where sigma falls by more than max_sigma_ratio
            x_ve, x0 = self.from_pure_noise(denoise, x, grid, i, sigmas[i + 1])
            return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0
        x_ve, sigma_hat = self.churn(x / grid.alphas_cumprod[i] ** 0.5, grid, i, generator)
        d, x0 = self.derivative(denoise, x_ve, grid, i, sigma_hat)
        sigma = sigma_hat or sigmas[i]
        dt = sigmas[i + 1] - sigma
        if sigmas[i + 1] == 0 or sigma > self.max_sigma_ratio * sigmas[i + 1]:
            x_ve = x_ve + d * dt
        else:
            d_next, _ = self.derivative(denoise, x_ve + d * dt, grid, i + 1)
            x_ve = x_ve + (d + d_next) / 2 * dt
        return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0
