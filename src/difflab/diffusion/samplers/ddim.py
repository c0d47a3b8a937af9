"""DDIM (Song et al. 2021) and its inversion."""

from __future__ import annotations

from torch import Tensor
from tqdm.auto import tqdm

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.grid import Grid
from difflab.diffusion.noise import randn_like
from difflab.diffusion.samplers.base import Callback, Sampler
from difflab.errors import UsageError


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z.

    s = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) (Eq. 16); eta = 0 is the
    deterministic sampler, eta = 1 ancestral DDPM. ``invert`` runs the deterministic map backwards.
    """

    name = "ddim"
    default_spacing = "leading"

    def __init__(self, num_steps: int = 50, *, eta: float = 0.0, **kwargs):
        super().__init__(num_steps, **kwargs)
        self.eta = eta

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        x0, eps = denoise(x, i)
        abar_t, abar_prev = grid.alphas_cumprod[i], grid.alphas_cumprod[i + 1]
        std = self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0 + max(1 - abar_prev - std**2, 0.0) ** 0.5 * eps
        if std > 0:
            x = x + std * randn_like(x, generator)
        return x, x0

    def invert(self, denoiser: Denoiser, x0: Tensor, grid: Grid | None = None, *, fixed_point_iterations: int = 1,
               callback: Callback | None = None, progress: bool = False) -> Tensor:
        """DDIM inversion: x0 -> x_T by running the eta = 0 update from the clean level up the grid.

        The exact inverse of the sampling step s <- t needs eps(x_t, t) at the x_t being solved for. The
        first guess uses the network at the current sample and the destination timestep, eps(x_s, t), as
        diffusers' DDIMInverseScheduler and null-text inversion (Mokady et al. 2023) do
        (``fixed_point_iterations=0`` reproduces diffusers). Each fixed-point iteration re-evaluates eps at
        the new x_t guess (Pan et al. 2023, AIDI), converging to the exact inverse of ``sample`` for one more
        network call per step.
        """
        grid = self.grid(denoiser.schedule) if grid is None else grid
        denoise = self.bind(denoiser, grid, x0.dtype)
        x = self.state(x0)
        for step, i in enumerate(tqdm(range(len(grid) - 1, -1, -1), desc=f"{self.name} inversion",
                                      disable=not progress, leave=False)):
            abar_s, abar_t = grid.alphas_cumprod[i + 1], grid.alphas_cumprod[i]
            x_t = x
            for _ in range(1 + fixed_point_iterations):
                _, eps = denoise(x_t, i)
                x0_hat = (x - (1 - abar_s) ** 0.5 * eps) / abar_s**0.5
                x_t = abar_t**0.5 * x0_hat + (1 - abar_t) ** 0.5 * eps
            x = x_t
            if callback is not None:
                callback({"i": step, "t": grid.t_value(i), "x": x, "denoised": x0_hat})
        return x.to(x0.dtype)


def require_invertible(sampler: Sampler) -> DDIMSampler:
    """The sampler, if inversion can run it backwards (deterministic DDIM); a clear error otherwise."""
    if not isinstance(sampler, DDIMSampler) or sampler.eta != 0:
        eta = f" (eta={sampler.eta})" if isinstance(sampler, DDIMSampler) else ""
        raise UsageError(f"inversion runs the deterministic DDIM sampler backwards: use sampler=ddim with eta=0, "
                         f"not {sampler!r}{eta}")
    return sampler
