"""Sampling grids: which of the T training timesteps a sampler visits.

The three spacings are those of Lin et al. 2023, Table 2, computed exactly as diffusers does, so that a
sampler here and its diffusers scheduler visit the same timesteps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from difflab.errors import UsageError

SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                     steps_offset: int = 0) -> Tensor:
    """``num_steps`` distinct integer timesteps in [0, T), descending.

    leading:  0, T//N, 2 T//N, ... (+ steps_offset)   -- DDPM/DDIM default; never visits t = T-1
    trailing: T-1, T-1-T/N, ...                       -- starts at the last, noisiest timestep
    linspace: N points evenly from 0 to T-1
    """
    if spacing not in SPACINGS:
        raise UsageError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise UsageError(f"num_steps must be in [1, {num_train_timesteps}] (the training timesteps), got {num_steps}")
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_steps
        timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    else:
        timesteps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    timesteps = torch.from_numpy(timesteps.astype(np.int64).copy())
    if timesteps.max() >= num_train_timesteps or timesteps.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} moves the grid outside [0, {num_train_timesteps})")
    return timesteps
