"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022b)."""

from __future__ import annotations

import math

from difflab.diffusion.grid import Grid
from difflab.diffusion.noise import randn_like
from difflab.diffusion.samplers.base import Sampler
from difflab.diffusion.schedules import MIN_ALPHA_BAR, NoiseSchedule
from difflab.diffusion.timesteps import spaced_timesteps
from difflab.errors import UsageError


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
        if self.timestep_spacing == "trailing" or self.sigma_schedule is not None:
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


class DPMSolverPlusPlus2MSDESampler(Sampler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5 and Appendix; k-diffusion's ``sample_dpmpp_2m_sde``).

    In x_ve = x_t / alpha with h = log(sigma / sigma_next): x_next = (sigma_next / sigma) e^{-eta h} x
    + (1 - e^{-(1 + eta) h}) x0 + a second-order correction in x0 - x0_prev (``solver_type`` midpoint or heun)
    + sigma_next sqrt(1 - e^{-2 eta h}) z. eta = 1 is the SDE, eta = 0 the ODE solver (DPM-Solver++(2M) with a
    midpoint correction). The last step lands on the data prediction. z is Gaussian noise drawn per step from
    the sampler's generator (k-diffusion draws it from a Brownian tree: the same marginals).
    """

    name = "dpmpp_2m_sde"
    default_spacing = "linspace"
    min_alpha_bar = MIN_ALPHA_BAR  # log sigma must be finite at the first point of a zero-terminal-SNR grid

    def __init__(self, num_steps: int = 20, *, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint", **kwargs):
        super().__init__(num_steps, **kwargs)
        if solver_type not in ("midpoint", "heun"):
            raise UsageError(f"solver_type must be midpoint or heun, got {solver_type!r}")
        self.eta, self.s_noise, self.solver_type = eta, s_noise, solver_type

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        memory = {} if memory is None else memory
        x0, eps = denoise(x, i)
        sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
        if sigma_next == 0:
            return x0, x0
        if math.isinf(sigma):  # from pure noise, the limit: x0 + sigma_next eps (eta = 0) or x0 + sigma_next z
            x_ve = x0 + sigma_next * (self.s_noise * randn_like(x0, generator) if self.eta else eps)
            memory["x0_prev"], memory["h_prev"] = x0, math.inf
            return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0
        h = math.log(sigma) - math.log(sigma_next)
        eta_h = self.eta * h
        decay = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
        x_ve = sigma_next / sigma * math.exp(-eta_h) * (x / grid.alphas_cumprod[i] ** 0.5) + decay * x0
        if "x0_prev" in memory:
            r = memory["h_prev"] / h
            factor = 0.5 * decay if self.solver_type == "midpoint" else decay / (-h - eta_h) + 1
            x_ve = x_ve + factor / r * (x0 - memory["x0_prev"])
        if self.eta:
            x_ve = x_ve + randn_like(x_ve, generator) * sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * self.s_noise
        memory["x0_prev"], memory["h_prev"] = x0, h
        return x_ve * grid.alphas_cumprod[i + 1] ** 0.5, x0
