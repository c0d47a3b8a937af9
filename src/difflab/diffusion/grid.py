"""The sampling grid: which noise levels a sampler visits, apart from how it steps between them.

A grid of N steps is N noise levels, each with its alpha_bar and the timestep the network is told there, followed
by the clean level (alpha_bar = 1) that the last step lands on. The levels are N of the training timesteps
(``spaced``, as diffusers spaces them) or any sigmas (``from_sigmas``: Karras et al. 2022's rho grid, the
exponential grid), where the network is told a fractional timestep. SDEdit starts part-way down a grid
(``from_index``); every solver takes one (k-diffusion's samplers take a list of sigmas the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import spaced_timesteps
from difflab.errors import UsageError

SIGMA_SCHEDULES = ("karras", "exponential", "flow")


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, N values from sigma_max down to sigma_min (float64; no trailing zero)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """N sigmas evenly spaced in log sigma from sigma_max down to sigma_min (k-diffusion's exponential grid)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """The flow-matching grid of Stable Diffusion 3's and FLUX's pipelines: flow times u = 1, ..., 1 / N evenly,
    shifted to s = shift u / (1 + (shift - 1) u) (Esser et al. 2024, Eq. 23), as sigma = s / (1 - s); the first is
    inf (pure noise)."""
    u = torch.linspace(1, 1 / num_steps, num_steps, dtype=torch.float64)
    s = shift * u / (1 + (shift - 1) * u)
    return torch.where(s < 1, s / (1 - s), torch.full_like(s, math.inf))


def sigma_grid(kind: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
               shift: float = 1.0) -> Tensor:
    """The sigmas of ``sigma_schedule=kind`` (karras | exponential between sigma_min and sigma_max; flow with
    ``shift``, from pure noise)."""
    if kind not in SIGMA_SCHEDULES:
        raise UsageError(f"unknown sigma_schedule {kind!r}; valid: {', '.join(SIGMA_SCHEDULES)} (or null for the "
                         "spaced training timesteps)")
    if kind == "flow":
        return flow_sigmas(num_steps, shift)
    if not 0 < sigma_min < sigma_max:
        raise UsageError(f"a sigma grid needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    if kind == "karras":
        return karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    return exponential_sigmas(num_steps, sigma_min, sigma_max)


@dataclass(frozen=True)
class Grid:
    timesteps: Tensor  # (N,) descending: the network's t at each step (LongTensor, or float64 between timesteps)
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

    @classmethod
    def from_sigmas(cls, schedule: NoiseSchedule, sigmas: Tensor) -> Grid:
        """The grid over any decreasing ``sigmas`` (> 0; the first may be inf, pure noise): alpha_bar = 1 / (1 +
        sigma^2), and the network is told
        the fractional timestep of each sigma on ``schedule`` (``NoiseSchedule.sigma_to_t``, as k-diffusion's
        discrete-schedule wrappers and diffusers' ``use_karras_sigmas`` do)."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if not bool((sigmas > 0).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError("a grid's sigmas must be positive and decreasing (the clean level is added after them)")
        abar = (1 / (1 + sigmas**2)).tolist()
        return cls(schedule.sigma_to_t(sigmas), (*abar, 1.0))

    @classmethod
    def sigma_schedule(cls, schedule: NoiseSchedule, kind: str, num_steps: int, sigma_min: float | None = None,
                       sigma_max: float | None = None, rho: float = 7.0, shift: float = 1.0) -> Grid:
        """``num_steps`` sigmas of ``kind`` (karras | exponential) between ``sigma_min`` and ``sigma_max``, by
        default the extremes of the schedule's own timesteps (as k-diffusion and diffusers)."""
        table = schedule.sigmas
        sigma_min = float(table[0]) if sigma_min is None else sigma_min
        sigma_max = float(table[-1]) if sigma_max is None else sigma_max
        return cls.from_sigmas(schedule, sigma_grid(kind, num_steps, sigma_min, sigma_max, rho, shift))

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
        """The timestep of point i for each sample of x: (B,) on x's device (long, or float64 between timesteps;
        float32 on MPS)."""
        value = self.timesteps[i]
        if not value.is_floating_point():
            return torch.full((x.shape[0],), int(value), dtype=torch.long, device=x.device)
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        return torch.full((x.shape[0],), float(value), dtype=dtype, device=x.device)

    def t_value(self, i: int) -> int | float:
        """The timestep of point i as a Python number, for callbacks and logs."""
        value = self.timesteps[i]
        return float(value) if value.is_floating_point() else int(value)
