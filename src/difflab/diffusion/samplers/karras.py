"""Solvers of the probability-flow ODE in the sigma parameterisation (Karras et al. 2022): Euler and Heun.

Karras et al. 2022, Eq. 4 with s(t) = 1: in x_ve = x_t / alpha, dx_ve / dsigma = (x_ve - x0_hat) / sigma,
sigma = sqrt((1 - abar) / abar). The steps take and return the variance-preserving x_t like every sampler
(x_ve = x_t / alpha at each end), so they run inside any loop. alpha_bar is floored at 2**-24 so that a
zero-terminal-SNR grid has a finite sigma_max (as diffusers does).
"""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion.grid import Grid
from difflab.diffusion.samplers.base import Denoise, Sampler


class KarrasSampler(Sampler):
    """Base of the samplers that step in sigma."""

    default_spacing = "linspace"  # diffusers' Euler/Heun default
    min_alpha_bar = 2.0**-24

    @staticmethod
    def derivative(denoise: Denoise, x_ve: Tensor, grid: Grid, i: int) -> tuple[Tensor, Tensor]:
        """(dx_ve/dsigma, x0_hat) at grid point i; the network sees the VP-scaled x_t = alpha x_ve."""
        x0, _ = denoise(x_ve * grid.alphas_cumprod[i] ** 0.5, i)
        return (x_ve - x0) / grid.sigmas[i], x0


class EulerSampler(KarrasSampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 with a first-order step).

    With exact arithmetic and no clipping this is DDIM with eta = 0 on the same grid (Karras et al. 2022,
    Sec. 3 and Appendix B).
    """

    name = "euler"

    def __init__(self, num_steps: int = 50, **kwargs):
        super().__init__(num_steps, **kwargs)

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        sigmas = grid.sigmas
        x_ve = x / grid.alphas_cumprod[i] ** 0.5
        d, x0 = self.derivative(denoise, x_ve, grid, i)
        x_ve = x_ve + d * (sigmas[i + 1] - sigmas[i])
        return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0


class HeunSampler(KarrasSampler):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

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
        x_ve = x / grid.alphas_cumprod[i] ** 0.5
        d, x0 = self.derivative(denoise, x_ve, grid, i)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0 or sigmas[i] > self.max_sigma_ratio * sigmas[i + 1]:
            x_ve = x_ve + d * dt
        else:
            d_next, _ = self.derivative(denoise, x_ve + d * dt, grid, i + 1)
            x_ve = x_ve + (d + d_next) / 2 * dt
        return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0
