"""Samplers: short loops over a grid of training timesteps, one signature for all (after k-diffusion).

    sampler = get_sampler("ddim", schedule, num_steps=50, eta=0.0)
    x0 = sampler.sample(model_fn, x_T, prediction_type="epsilon", generator=g)

``model_fn(x_t, t)`` is the network (or a guidance wrapper around it): x_t like x_T, t a LongTensor (B,)
of training timesteps. x_T is the variance-preserving state at the grid's first timestep: unit-variance
noise when sampling from scratch, a noised image when ``from_step`` starts part-way. The sampler state and all
coefficients are float64 (float32 on MPS, which has no float64); the model sees x_T's dtype and the
result is returned in it. A grid is N timesteps t_0 > ... > t_{N-1} followed by the clean level
(alpha_bar = 1), so a sampler makes N steps and ends on its data prediction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.diffusion.parameterization import (
    EpsilonPrediction,
    Prediction,
    get_prediction,
    posterior_coefficients,
)
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import spaced_timesteps

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
Denoiser = Callable[[Tensor, int], tuple[Tensor, Tensor]]


class Sampler:
    """Shared set-up: the timestep grid, its alpha_bar values, and the adaptor from a network to (x0, eps)."""

    name: ClassVar[str]
    default_spacing: ClassVar[str] = "leading"  # per sampler: diffusers' default for the matching scheduler

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,  # model evaluations (heun: steps; it makes 2N - 1 evaluations)
        *,
        timestep_spacing: str | None = None,  # leading | trailing | linspace; None: the sampler's default
        steps_offset: int = 0,  # added to 'leading' timesteps (Stable Diffusion uses 1)
        clip_sample: bool = False,  # clamp the x0 estimate to +-clip_sample_range at every step
        clip_sample_range: float = 1.0,
    ):
        self.schedule = schedule
        self.num_steps = num_steps
        self.timestep_spacing = timestep_spacing or self.default_spacing
        self.steps_offset = steps_offset
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.timesteps = self._grid()
        # alpha_bar at each grid timestep, then 1.0 for the clean level the last step lands on
        self.alphas_cumprod = torch.cat(
            [schedule.alphas_cumprod[self.timesteps], torch.ones(1, dtype=torch.float64)]
        ).tolist()

    def _grid(self) -> Tensor:
        return spaced_timesteps(self.schedule.num_timesteps, self.num_steps, self.timestep_spacing,
                                self.steps_offset)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_steps={self.num_steps}, timestep_spacing={self.timestep_spacing!r}, "
                f"schedule={self.schedule.name!r})")

    def from_step(self, index: int) -> Sampler:
        """This sampler on the rest of its grid, from grid index ``index`` on: its ``sample`` then takes the
        state x_t at t = timesteps[index] (image-to-image / SDEdit, Meng et al. 2022, starts part-way down)."""
        if not 0 <= index < self.num_steps:
            raise ValueError(f"start index {index} outside the grid of {self.num_steps} steps")
        sampler = copy.copy(self)
        sampler.num_steps = self.num_steps - index
        sampler.timesteps = self.timesteps[index:]
        sampler.alphas_cumprod = self.alphas_cumprod[index:]
        if hasattr(self, "sigmas"):
            sampler.sigmas = self.sigmas[index:]
        return sampler

    # ---- pieces every loop uses ---------------------------------------------------------------

    def denoiser(self, model_fn: ModelFn, prediction_type: str | Prediction, x_T: Tensor) -> Denoiser:
        """Adapt ``model_fn`` to denoise(x, i) -> (x0_hat, eps_hat) at grid index i, in x's dtype.

        With ``clip_sample`` the x0 estimate is clamped and eps_hat is left as the network gave it, as
        diffusers does (``use_clipped_model_output=False``).
        """
        prediction = get_prediction(prediction_type)
        if isinstance(prediction, EpsilonPrediction) and self.alphas_cumprod[0] == 0:
            raise ValueError(
                "the grid starts at zero SNR (alpha_bar = 0), where an epsilon-prediction model cannot "
                "estimate x0; train with prediction_type='v_prediction' (Lin et al. 2023) or use "
                "timestep_spacing='leading'"
            )
        timesteps = self.timesteps.tolist()
        model_dtype = x_T.dtype

        def denoise(x: Tensor, i: int) -> tuple[Tensor, Tensor]:
            abar = self.alphas_cumprod[i]
            t = torch.full((x.shape[0],), timesteps[i], dtype=torch.long, device=x.device)
            output = model_fn(x.to(model_dtype), t).to(x.dtype)
            x0, eps = prediction.to_x0_eps(output, x, abar**0.5, (1 - abar) ** 0.5)
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            return x0, eps

        return denoise

    @staticmethod
    def state(x_T: Tensor) -> Tensor:
        return x_T.to(torch.float32 if x_T.device.type == "mps" else torch.float64)

    @staticmethod
    def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Standard normal noise, drawn in float32 on the generator's device (reproducible across dtypes)."""
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device).to(device=x.device, dtype=x.dtype)

    def steps(self, progress: bool) -> Iterator[tuple[int, int]]:
        """(grid index, timestep) pairs with an optional tqdm bar."""
        timesteps = self.timesteps.tolist()
        return iter(tqdm(list(enumerate(timesteps)), desc=self.name, disable=not progress, leave=False))

    def sample(self, model_fn: ModelFn, x_T: Tensor, prediction_type: str | Prediction = "epsilon", *,
               generator: torch.Generator | None = None, callback: Callback | None = None,
               progress: bool = False) -> Tensor:
        """Run the sampler from unit-variance noise x_T: (B, ...) and return x0 in x_T's dtype.

        callback, if given, receives {"i", "t", "x", "denoised"} after every step.
        """
        raise NotImplementedError


class DDPMSampler(Sampler):
    """Ancestral sampling of Ho et al. 2020, Algorithm 2, through the x0 form of the posterior (Eqs. 6-7).

    Each step draws x_prev ~ N(mu_tilde(x_t, x0_hat), var) with the posterior variance beta_tilde (Eq. 7;
    diffusers ``fixed_small``) or, with variance="large", beta (``fixed_large``). With fewer steps than
    training timesteps the effective beta between grid points, 1 - abar_t / abar_prev, is used.
    """

    name = "ddpm"
    default_spacing = "leading"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 1000, *, variance: str = "small", **kwargs):
        super().__init__(schedule, num_steps, **kwargs)
        if variance not in ("small", "large"):
            raise ValueError(f"unknown DDPM variance {variance!r}; valid: small (beta_tilde), large (beta)")
        self.variance = variance

    def sample(self, model_fn, x_T, prediction_type="epsilon", *, generator=None, callback=None, progress=False):
        denoise = self.denoiser(model_fn, prediction_type, x_T)
        x = self.state(x_T)
        for i, t in self.steps(progress):
            x0, _ = denoise(x, i)
            abar_t, abar_prev = self.alphas_cumprod[i], self.alphas_cumprod[i + 1]
            coef_x0, coef_xt, variance = posterior_coefficients(abar_t, abar_prev)
            if self.variance == "large":
                variance = 1 - abar_t / abar_prev
            x = coef_x0 * x0 + coef_xt * x
            if i < self.num_steps - 1:  # the last step lands on the clean level: no noise
                x = x + variance**0.5 * self.noise_like(x, generator)
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": x0})
        return x.to(x_T.dtype)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z.

    s = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) (Eq. 16); eta = 0 is the
    deterministic sampler, eta = 1 ancestral DDPM. ``invert`` runs the deterministic map backwards.
    """

    name = "ddim"
    default_spacing = "leading"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, *, eta: float = 0.0, **kwargs):
        super().__init__(schedule, num_steps, **kwargs)
        self.eta = eta

    def sample(self, model_fn, x_T, prediction_type="epsilon", *, generator=None, callback=None, progress=False):
        denoise = self.denoiser(model_fn, prediction_type, x_T)
        x = self.state(x_T)
        for i, t in self.steps(progress):
            x0, eps = denoise(x, i)
            abar_t, abar_prev = self.alphas_cumprod[i], self.alphas_cumprod[i + 1]
            std = self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
            x = abar_prev**0.5 * x0 + max(1 - abar_prev - std**2, 0.0) ** 0.5 * eps
            if std > 0:
                x = x + std * self.noise_like(x, generator)
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": x0})
        return x.to(x_T.dtype)

    def invert(self, model_fn: ModelFn, x0: Tensor, prediction_type: str | Prediction = "epsilon", *,
               fixed_point_iterations: int = 1, callback: Callback | None = None,
               progress: bool = False) -> Tensor:
        """DDIM inversion: x0 -> x_T by running the eta = 0 update from the clean level up the grid.

        The exact inverse of the sampling step s <- t needs eps(x_t, t) at the x_t being solved for. The
        first guess uses the network at the current sample and the destination timestep, eps(x_s, t), as
        diffusers' DDIMInverseScheduler and null-text inversion (Mokady et al. 2023) do
        (``fixed_point_iterations=0`` reproduces diffusers). Each fixed-point iteration re-evaluates eps at
        the new x_t guess (Pan et al. 2023, AIDI), converging to the exact inverse of ``sample``: on the
        closed-form test model with 1000 steps one iteration cuts the round-trip error from 4e-2 to 1e-4,
        for one more network call per step.
        """
        denoise = self.denoiser(model_fn, prediction_type, x0)
        x = self.state(x0)
        for step, i in enumerate(tqdm(range(self.num_steps - 1, -1, -1), desc=f"{self.name} inversion",
                                      disable=not progress, leave=False)):
            abar_s, abar_t = self.alphas_cumprod[i + 1], self.alphas_cumprod[i]
            x_t = x
            for _ in range(1 + fixed_point_iterations):
                _, eps = denoise(x_t, i)
                x0_hat = (x - (1 - abar_s) ** 0.5 * eps) / abar_s**0.5
                x_t = abar_t**0.5 * x0_hat + (1 - abar_t) ** 0.5 * eps
            x = x_t
            if callback is not None:
                callback({"i": step, "t": int(self.timesteps[i]), "x": x, "denoised": x0_hat})
        return x.to(x0.dtype)


def _log_snr_half(abar: float) -> float:
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
    r = h_prev / h; the first step is first order (D = x0, i.e. DDIM) and so is the last, which lands on
    sigma = 0 and returns the data prediction, as diffusers' DPMSolverMultistepScheduler with
    ``final_sigmas_type="zero"``. For leading and linspace spacing the grid has N + 1 points of which the
    last (t = 0) is replaced by the clean level, again as diffusers.
    """

    name = "dpmpp_2m"
    default_spacing = "linspace"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 20, **kwargs):
        super().__init__(schedule, num_steps, **kwargs)

    def _grid(self) -> Tensor:
        if self.timestep_spacing == "trailing":
            return super()._grid()
        return spaced_timesteps(self.schedule.num_timesteps, self.num_steps + 1, self.timestep_spacing,
                                self.steps_offset)[:-1]

    def sample(self, model_fn, x_T, prediction_type="epsilon", *, generator=None, callback=None, progress=False):
        denoise = self.denoiser(model_fn, prediction_type, x_T)
        lambdas = [_log_snr_half(abar) for abar in self.alphas_cumprod]
        x = self.state(x_T)
        x0_prev = None
        for i, t in self.steps(progress):
            x0, _ = denoise(x, i)
            abar_next = self.alphas_cumprod[i + 1]
            if abar_next == 1.0:  # sigma_next = 0: the first-order update reduces to x0
                x = x0
            else:
                sigma, sigma_next = (1 - self.alphas_cumprod[i]) ** 0.5, (1 - abar_next) ** 0.5
                h = lambdas[i + 1] - lambdas[i]
                data = x0
                if x0_prev is not None:
                    r = (lambdas[i] - lambdas[i - 1]) / h
                    data = x0 + (x0 - x0_prev) / (2 * r)
                x = (sigma_next / sigma) * x - abar_next**0.5 * math.expm1(-h) * data
            x0_prev = x0
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": x0})
        return x.to(x_T.dtype)


class _KarrasSampler(Sampler):
    """Base of the samplers that integrate the probability-flow ODE in the sigma parameterisation.

    Karras et al. 2022, Eq. 4 with s(t) = 1: in x_ve = x_t / alpha, dx_ve / dsigma = (x_ve - x0_hat) / sigma,
    sigma = sqrt((1 - abar) / abar). alpha_bar is floored at 2**-24 so that a zero-terminal-SNR grid has a
    finite sigma_max (as diffusers does).
    """

    default_spacing = "linspace"  # diffusers' Euler/Heun default

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, **kwargs):
        super().__init__(schedule, num_steps, **kwargs)
        abar = [max(a, 2.0**-24) for a in self.alphas_cumprod]
        self.alphas_cumprod = abar
        self.sigmas = [((1 - a) / a) ** 0.5 for a in abar]  # VE sigma per grid point; last is 0

    def derivative(self, denoise: Denoiser, x_ve: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """(dx_ve/dsigma, x0_hat) at grid index i; the network sees the VP-scaled x_t = alpha x_ve."""
        x0, _ = denoise(x_ve * self.alphas_cumprod[i] ** 0.5, i)
        return (x_ve - x0) / self.sigmas[i], x0


class EulerSampler(_KarrasSampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 with a first-order step).

    With exact arithmetic and no clipping this is DDIM with eta = 0 on the same grid (Karras et al. 2022,
    Sec. 3 and Appendix B).
    """

    name = "euler"

    def sample(self, model_fn, x_T, prediction_type="epsilon", *, generator=None, callback=None, progress=False):
        denoise = self.denoiser(model_fn, prediction_type, x_T)
        x = self.state(x_T) * (1 + self.sigmas[0] ** 2) ** 0.5  # x_ve = x_vp / alpha
        for i, t in self.steps(progress):
            d, x0 = self.derivative(denoise, x, i)
            x = x + d * (self.sigmas[i + 1] - self.sigmas[i])
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": x0})
        return x.to(x_T.dtype)


class HeunSampler(_KarrasSampler):
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

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 25, *, max_sigma_ratio: float = 100.0, **kwargs):
        super().__init__(schedule, num_steps, **kwargs)
        self.max_sigma_ratio = max_sigma_ratio

    def sample(self, model_fn, x_T, prediction_type="epsilon", *, generator=None, callback=None, progress=False):
        denoise = self.denoiser(model_fn, prediction_type, x_T)
        x = self.state(x_T) * (1 + self.sigmas[0] ** 2) ** 0.5
        for i, t in self.steps(progress):
            d, x0 = self.derivative(denoise, x, i)
            dt = self.sigmas[i + 1] - self.sigmas[i]
            if self.sigmas[i + 1] == 0 or self.sigmas[i] > self.max_sigma_ratio * self.sigmas[i + 1]:
                x = x + d * dt
            else:
                x_euler = x + d * dt
                d_next, _ = self.derivative(denoise, x_euler, i + 1)
                x = x + (d + d_next) / 2 * dt
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": x0})
        return x.to(x_T.dtype)


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDPMSampler, DDIMSampler, DPMSolverPlusPlus2MSampler, EulerSampler, HeunSampler)
}


def get_sampler(name: str, schedule: NoiseSchedule, **kwargs) -> Sampler:
    """Build the sampler registered as ``name`` (ddpm, ddim, dpmpp_2m, euler, heun) over ``schedule``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](schedule, **kwargs)
