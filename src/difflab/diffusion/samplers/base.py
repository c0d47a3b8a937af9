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
from difflab.diffusion.grid import Grid
from difflab.diffusion.noise import Generators
from difflab.diffusion.schedules import NoiseSchedule

Denoise = Callable[[Tensor, int], tuple[Tensor, Tensor]]  # (x at grid point i, i) -> (x0_hat, eps_hat)
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
    ):
        self.num_steps = num_steps
        self.timestep_spacing = timestep_spacing or self.default_spacing
        self.steps_offset = steps_offset
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, timestep_spacing={self.timestep_spacing!r})"

    def with_steps(self, num_steps: int) -> Sampler:
        """This sampler with another number of steps."""
        sampler = copy.copy(self)
        sampler.num_steps = num_steps
        return sampler

    def grid(self, schedule: NoiseSchedule) -> Grid:
        return Grid.spaced(schedule, self.num_steps, self.timestep_spacing, self.steps_offset, self.min_alpha_bar)

    def bind(self, denoiser: Denoiser, grid: Grid, model_dtype: torch.dtype) -> Denoise:
        """``denoise(x, i)`` -> (x0_hat, eps_hat) at grid point i. With ``clip_sample`` the x0 estimate is clamped
        and eps_hat is left as the network gave it, as diffusers does (``use_clipped_model_output=False``)."""

        def denoise(x: Tensor, i: int) -> tuple[Tensor, Tensor]:
            x0, eps = denoiser(x, grid.t(i, x), grid.alphas_cumprod[i], model_dtype=model_dtype)
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
                callback({"i": i, "t": int(grid.timesteps[i]), "x": x, "denoised": x0})
        return x.to(x_T.dtype)
