"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2)."""

from __future__ import annotations

from difflab.diffusion.noise import randn_like
from difflab.diffusion.parameterization import posterior_coefficients
from difflab.diffusion.samplers.base import Sampler


class DDPMSampler(Sampler):
    """Ancestral sampling of Ho et al. 2020, Algorithm 2, through the x0 form of the posterior (Eqs. 6-7).

    Each step draws x_prev ~ N(mu_tilde(x_t, x0_hat), var) with the posterior variance beta_tilde (Eq. 7;
    diffusers ``fixed_small``) or, with variance="large", beta (``fixed_large``). With fewer steps than
    training timesteps the effective beta between grid points, 1 - abar_t / abar_prev, is used.
    """

    name = "ddpm"
    default_spacing = "leading"

    def __init__(self, num_steps: int = 1000, *, variance: str = "small", **kwargs):
        super().__init__(num_steps, **kwargs)
        if variance not in ("small", "large"):
            raise ValueError(f"unknown DDPM variance {variance!r}; valid: small (beta_tilde), large (beta)")
        self.variance = variance

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        x0, _ = denoise(x, i)
        abar_t, abar_prev = grid.alphas_cumprod[i], grid.alphas_cumprod[i + 1]
        coef_x0, coef_xt, variance = posterior_coefficients(abar_t, abar_prev)
        if self.variance == "large":
            variance = 1 - abar_t / abar_prev
        x = coef_x0 * x0 + coef_xt * x
        if abar_prev < 1:  # the last step lands on the clean level: no noise
            x = x + variance**0.5 * randn_like(x, generator)
        return x, x0
