"""DPM-Solver++(2M) (Lu et al. 2022b)."""

from __future__ import annotations

import math

from difflab.diffusion.grid import Grid
from difflab.diffusion.samplers.base import Sampler
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import spaced_timesteps


def log_snr_half(abar: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)), +-inf at the ends."""
    if abar <= 0:
        return -math.inf
    if abar >= 1:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


class DPMSolverPlusPlus2MSampler(Sampler):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022b, Algorithm 2).

    In lambda = log(alpha / sigma) with h = lambda_next - lambda:
    x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D, D = x0 + (x0 - x0_prev) / (2 r),
    r = h_prev / h; the first step of a loop is first order (D = x0, i.e. DDIM) and so is the last, which lands on
    sigma = 0 and returns the data prediction, as diffusers' DPMSolverMultistepScheduler with
    ``final_sigmas_type="zero"``. For leading and linspace spacing the grid has N + 1 points of which the
    last (t = 0) is replaced by the clean level, again as diffusers.
    """

    name = "dpmpp_2m"
    default_spacing = "linspace"

    def __init__(self, num_steps: int = 20, **kwargs):
        super().__init__(num_steps, **kwargs)

    def grid(self, schedule: NoiseSchedule) -> Grid:
        if self.timestep_spacing == "trailing":
            return super().grid(schedule)
        timesteps = spaced_timesteps(schedule.num_timesteps, self.num_steps + 1, self.timestep_spacing,
                                     self.steps_offset)[:-1]
        return Grid.from_timesteps(schedule, timesteps)

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        memory = {} if memory is None else memory
        x0, _ = denoise(x, i)
        abar, abar_next = grid.alphas_cumprod[i], grid.alphas_cumprod[i + 1]
        if abar_next == 1.0:  # sigma_next = 0: the first-order update reduces to x0
            x = x0
        else:
            sigma, sigma_next = (1 - abar) ** 0.5, (1 - abar_next) ** 0.5
            h = log_snr_half(abar_next) - log_snr_half(abar)
            data = x0
            if "x0_prev" in memory:
                r = (log_snr_half(abar) - memory["lambda_prev"]) / h
                data = x0 + (x0 - memory["x0_prev"]) / (2 * r)
            x = (sigma_next / sigma) * x - abar_next**0.5 * math.expm1(-h) * data
        memory["x0_prev"], memory["lambda_prev"] = x0, log_snr_half(abar)
        return x, x0
