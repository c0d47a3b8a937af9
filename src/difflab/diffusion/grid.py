"""The sampling grid: which noise levels a sampler visits, apart from how it steps between them.

A grid of N steps is N training timesteps t_0 > ... > t_{N-1} with their alpha_bar values, followed by the
clean level (alpha_bar = 1) that the last step lands on. SDEdit starts part-way down a grid (``from_index``);
every solver takes one (k-diffusion's samplers take a list of sigmas the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import spaced_timesteps


@dataclass(frozen=True)
class Grid:
    timesteps: Tensor  # (N,) LongTensor, descending: the network's t at each step
    alphas_cumprod: tuple[float, ...]  # N + 1 values: alpha_bar at each timestep, then 1.0 (the clean level)

    def __post_init__(self):
        if len(self.alphas_cumprod) != len(self.timesteps) + 1 or self.alphas_cumprod[-1] != 1.0:
            raise ValueError("a grid has one alpha_bar per timestep followed by 1.0 for the clean level")

    @classmethod
    def from_timesteps(cls, schedule: NoiseSchedule, timesteps: Tensor, min_alpha_bar: float = 0.0) -> Grid:
        """The grid over ``timesteps`` of ``schedule``; alpha_bar floored at ``min_alpha_bar`` (Karras-style
        solvers need a finite sigma_max at zero terminal SNR: diffusers floors at 2**-24)."""
        abar = [max(float(a), min_alpha_bar) for a in schedule.alphas_cumprod[timesteps]]
        return cls(timesteps.long(), (*abar, 1.0))

    @classmethod
    def spaced(cls, schedule: NoiseSchedule, num_steps: int, spacing: str = "leading", steps_offset: int = 0,
               min_alpha_bar: float = 0.0) -> Grid:
        """``num_steps`` timesteps spaced as diffusers spaces them (``spaced_timesteps``)."""
        timesteps = spaced_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
        return cls.from_timesteps(schedule, timesteps, min_alpha_bar)

    def __len__(self) -> int:
        return len(self.timesteps)

    def from_index(self, start: int) -> Grid:
        """The rest of the grid from step ``start`` on (image-to-image starts part-way down)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start index {start} outside the grid of {len(self)} steps")
        return Grid(self.timesteps[start:], self.alphas_cumprod[start:])

    @cached_property  # read at every step of the sigma samplers: computed once per grid, not per step
    def sigmas(self) -> list[float]:
        """The variance-exploding sigma = sqrt((1 - abar) / abar) of each point (Karras et al. 2022, Eq. 4 with
        s(t) = 1); the last is 0; inf where alpha_bar = 0."""
        return [math.inf if a == 0 else ((1 - a) / a) ** 0.5 for a in self.alphas_cumprod]

    def t(self, i: int, x: Tensor) -> Tensor:
        """The timestep of point i for each sample of x: (B,) on x's device."""
        return torch.full((x.shape[0],), int(self.timesteps[i]), dtype=torch.long, device=x.device)
