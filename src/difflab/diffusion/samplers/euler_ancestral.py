"""Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``; diffusers' EulerAncestralDiscreteScheduler)."""

from __future__ import annotations

from difflab.diffusion.noise import randn_like
from difflab.diffusion.samplers.karras import KarrasSampler


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a stochastic step sigma_from -> sigma_to: a deterministic step down to sigma_down,
    then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2. eta = 1 gives the DDPM posterior
    variance (Song et al. 2021, Eq. 16, in sigma); eta = 0 the Euler step."""
    if eta == 0:
        return sigma_to, 0.0
    if sigma_from == float("inf"):  # the limit from pure noise
        sigma_up = min(sigma_to, eta * sigma_to)
        return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


class EulerAncestralSampler(KarrasSampler):
    """An Euler step of the probability-flow ODE (Karras et al. 2022, Eq. 4) to sigma_down, then noise of std
    sigma_up (``ancestral_step``): the ancestral sampler of k-diffusion, which matches DDPM's marginals."""

    name = "euler_ancestral"

    def __init__(self, num_steps: int = 50, *, eta: float = 1.0, s_noise: float = 1.0, **kwargs):
        super().__init__(num_steps, **kwargs)
        self.eta = eta  # 1: full ancestral noise; 0: Euler
        self.s_noise = s_noise  # scale of the added noise (k-diffusion's s_noise)

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        sigmas = grid.sigmas
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], self.eta)
        if sigmas[i] == float("inf"):
            x_ve, x0 = self.from_pure_noise(denoise, x, grid, i, sigma_down)
        else:
            x_ve = x / grid.alphas_cumprod[i] ** 0.5
            d, x0 = self.derivative(denoise, x_ve, grid, i)
            x_ve = x_ve + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x_ve = x_ve + randn_like(x_ve, generator) * self.s_noise * sigma_up
        return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0
