"""Editing with a trained denoiser: image-to-image (SDEdit) starts and RePaint inpainting.

Everything here works in the diffusion space (pixels, or a first stage's latents) on a sampler's grid, and
through the sampler's own step: any solver edits.
"""

from __future__ import annotations

from torch import Tensor
from tqdm.auto import tqdm

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.grid import Grid
from difflab.diffusion.noise import Generators, randn_like
from difflab.diffusion.samplers.base import Callback, Sampler
from difflab.errors import UsageError


def strength_start_index(num_steps: int, strength: float) -> int:
    """The grid index SDEdit (Meng et al. 2022) starts from: the last round(down) ``strength * num_steps`` steps
    are run, as diffusers' image-to-image pipelines do. strength 1 runs every step (from pure noise), 0 none."""
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"strength must be in [0, 1] (0: return the input, 1: ignore it), got {strength}")
    return num_steps - min(int(num_steps * strength), num_steps)


def noise_to_start(grid: Grid, x0: Tensor, noise: Tensor) -> Tensor:
    """q(x_t | x0) at the grid's first timestep: sqrt(abar) x0 + sqrt(1 - abar) noise (Ho et al. 2020, Eq. 4)."""
    abar = grid.alphas_cumprod[0]
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def repaint(sampler: Sampler, denoiser: Denoiser, x_T: Tensor, known: Tensor, mask: Tensor, grid: Grid | None = None,
            *, generator: Generators = None, resample: int = 1, callback: Callback | None = None,
            progress: bool = False) -> Tensor:
    """Inpainting by RePaint (Lugmayr et al. 2022, Algorithm 1) with ``sampler``'s step on ``grid``.

    ``known``: x0 (B, ...) in the diffusion space; ``mask``: 1 where to generate, 0 where ``known`` is kept,
    broadcastable to it. At every step the unknown part takes the sampler's step (the paper's is DDPM's; DDIM and
    the ODE solvers work too) and the known part is ``known`` re-noised to the new level with fresh noise,
    x = sqrt(abar) known + sqrt(1 - abar) z; the two are joined by the mask. ``resample`` = U > 1 repeats each step
    U times, going back between repeats by q(x_t | x_prev) = N(sqrt(abar_t / abar_prev) x_prev,
    (1 - abar_t / abar_prev) I) (RePaint's resampling with jump length 1), which lets the generated part
    harmonise with the known part. The last step lands on the clean level, so the result equals ``known`` exactly
    where mask = 0.
    """
    if resample < 1:
        raise UsageError(f"resample must be >= 1 (1: no resampling), got {resample}")
    grid = sampler.grid(denoiser.schedule) if grid is None else grid
    denoise = sampler.bind(denoiser, grid, x_T.dtype)
    x, memory = sampler.state(x_T), {}
    known, mask = known.to(x), mask.to(x)
    for i in tqdm(range(len(grid)), desc=f"{sampler.name} repaint", disable=not progress, leave=False):
        abar_t, abar_prev = grid.alphas_cumprod[i], grid.alphas_cumprod[i + 1]
        before = dict(memory)  # a multistep solver's history: each repeat steps from the same one
        for u in range(resample):
            memory.clear()
            memory.update(before)
            generated, x0 = sampler.step(denoise, x, grid, i, generator=generator, memory=memory)
            kept = abar_prev**0.5 * known
            if abar_prev < 1:
                kept = kept + (1 - abar_prev) ** 0.5 * randn_like(x, generator)
            x_prev = mask * generated + (1 - mask) * kept
            if u < resample - 1:  # back up one step and redo it
                ratio = abar_t / abar_prev
                x = ratio**0.5 * x_prev + (1 - ratio) ** 0.5 * randn_like(x, generator)
        x = x_prev
        if callback is not None:
            callback({"i": i, "t": grid.t_value(i), "x": x, "denoised": x0})
    return x.to(x_T.dtype)
