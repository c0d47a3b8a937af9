"""What every sampler shares: its grid's layout, the binding of a denoiser to that grid, and the loop.

A sampler is a solver step ``step(denoise, x, grid, i)`` that takes the state x at grid point i to point i + 1, and
the settings of the grid it runs on by default (``grid(schedule)``). ``sample`` is the loop over a grid, so any
step runs from pure noise, part-way down a grid (image-to-image) or inside RePaint's loop. The state is the
variance-preserving x_t in float64 (float32 on MPS, which has no float64); the model sees x_T's dtype and the
result comes back in it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.grid import Grid, sigma_grid
from difflab.diffusion.noise import Generators
from difflab.diffusion.schedules import NoiseSchedule

Denoise = Callable[..., tuple[Tensor, Tensor]]  # (x at grid point i, i[, sigma=]) -> (x0_hat, eps_hat)
Callback = Callable[[dict[str, Any]], None]


class Sampler:
    """A solver and the grid it runs on: N steps spaced as diffusers spaces its matching scheduler's."""

    name: ClassVar[str]
    default_spacing: ClassVar[str] = "leading"  # per sampler: diffusers' default for the matching scheduler
    min_alpha_bar: ClassVar[float] = 0.0  # floor of the grid's alpha_bar (samplers in sigma need sigma_max finite)

    def __init__(
        self,
        num_steps: int = 50,  # grid steps (heun makes 2N - 1 model evaluations)
        *,
        timestep_spacing: str | None = None,  # leading | trailing | linspace; None: the sampler's default
        steps_offset: int = 0,  # added to 'leading' timesteps (Stable Diffusion uses 1)
        clip_sample: bool = False,  # clamp the x0 estimate to +-clip_sample_range at every step
        clip_sample_range: float = 1.0,
        sigma_schedule: str | None = None,  # karras | exponential: a grid of sigmas instead of spaced timesteps
        rho: float = 7.0,  # the Karras grid's rho (Karras et al. 2022, Eq. 5)
        sigma_min: float | None = None,  # the sigma grid's ends; None: the schedule's sigma at t = 0 and t = T - 1
        sigma_max: float | None = None,
        shift: float = 1.0,  # sigma_schedule=flow: SD3's shift of the flow times
    ):
        self.num_steps = num_steps
        self.timestep_spacing = timestep_spacing or self.default_spacing
        self.steps_offset = steps_offset
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        if sigma_schedule is not None:
            sigma_grid(sigma_schedule, 2, 1.0, 2.0)  # a wrong name fails here, at instantiation, not at sampling
        self.sigma_schedule, self.rho, self.sigma_min, self.sigma_max = sigma_schedule, rho, sigma_min, sigma_max
        self.shift = shift

    def __repr__(self) -> str:
        spacing = (f"sigma_schedule={self.sigma_schedule!r}" if self.sigma_schedule
                   else f"timestep_spacing={self.timestep_spacing!r}")
        return f"{type(self).__name__}(num_steps={self.num_steps}, {spacing})"

    def with_steps(self, num_steps: int) -> Sampler:
        """This sampler with another number of steps."""
        sampler = copy.copy(self)
        sampler.num_steps = num_steps
        return sampler

    def grid(self, schedule: NoiseSchedule) -> Grid:
        """The sigma grid of ``sigma_schedule`` if set, else ``num_steps`` spaced training timesteps."""
        if self.sigma_schedule is not None:
            return Grid.sigma_schedule(schedule, self.sigma_schedule, self.num_steps, self.sigma_min,
                                       self.sigma_max, self.rho, self.shift)
        return Grid.spaced(schedule, self.num_steps, self.timestep_spacing, self.steps_offset, self.min_alpha_bar)

    def bind(self, denoiser: Denoiser, grid: Grid, model_dtype: torch.dtype) -> Denoise:
        """``denoise(x, i)`` -> (x0_hat, eps_hat) at grid point i, or with ``sigma=`` at that noise level off the
        grid (Karras et al.'s churn), x then being the VP x_t there. With ``clip_sample`` the x0 estimate is clamped
        and eps_hat is left as the network gave it, as diffusers does (``use_clipped_model_output=False``)."""

        def denoise(x: Tensor, i: int, sigma: float | None = None) -> tuple[Tensor, Tensor]:
            if sigma is None:
                t, abar = grid.t(i, x), grid.alphas_cumprod[i]
            else:
                dtype = torch.float32 if x.device.type == "mps" else torch.float64
                t = denoiser.schedule.sigma_to_t(torch.tensor([sigma], dtype=torch.float64))
                t, abar = t.to(x.device, dtype).expand(x.shape[0]), 1 / (1 + sigma**2)
            x0, eps = denoiser(x, t, abar, model_dtype=model_dtype)
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            return x0, eps

        return denoise

    def step(self, denoise: Denoise, x: Tensor, grid: Grid, i: int, *, generator: Generators = None,
             memory: dict | None = None) -> tuple[Tensor, Tensor]:
        """x at grid point i -> (x at point i + 1, the x0 estimate used). ``memory``: a dict kept across the steps
        of one loop, for multistep solvers."""
        raise NotImplementedError

    @staticmethod
    def state(x: Tensor) -> Tensor:
        return x.to(torch.float32 if x.device.type == "mps" else torch.float64)

    def sample(self, denoiser: Denoiser, x_T: Tensor, grid: Grid | None = None, *, generator: Generators = None,
               callback: Callback | None = None, progress: bool = False) -> Tensor:
        """Run the steps from x_T: (B, ...), the state at the grid's first point (unit-variance noise from scratch),
        to the clean level; returns x0 in x_T's dtype. ``grid``: default ``self.grid(denoiser.schedule)``.
        ``generator``: one, or one per sample. ``callback`` gets {"i", "t", "x", "denoised"} after every step."""
        grid = self.grid(denoiser.schedule) if grid is None else grid
        denoise = self.bind(denoiser, grid, x_T.dtype)
        x, memory = self.state(x_T), {}
        for i in tqdm(range(len(grid)), desc=self.name, disable=not progress, leave=False):
            x, x0 = self.step(denoise, x, grid, i, generator=generator, memory=memory)
            if callback is not None:
                callback({"i": i, "t": grid.t_value(i), "x": x, "denoised": x0})
        return x.to(x_T.dtype)
