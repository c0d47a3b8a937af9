"""Editing with a trained denoiser: image-to-image (SDEdit) starts and RePaint inpainting.

Everything here works in the diffusion space (pixels, or a first stage's latents) on a sampler's grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.diffusion.parameterization import Prediction
from difflab.diffusion.samplers import Callback, DDIMSampler, DDPMSampler, ModelFn, Sampler


def strength_start_index(num_steps: int, strength: float) -> int:
    """The grid index SDEdit (Meng et al. 2022) starts from: the last round(down) ``strength * num_steps`` steps
    are run, as diffusers' image-to-image pipelines do. strength 1 runs every step (from pure noise), 0 none."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0: return the input, 1: ignore it), got {strength}")
    return num_steps - min(int(num_steps * strength), num_steps)


def noise_to_start(sampler: Sampler, x0: Tensor, noise: Tensor) -> Tensor:
    """q(x_t | x0) at the sampler's first grid timestep: sqrt(abar) x0 + sqrt(1 - abar) noise (Ho et al. 2020,
    Eq. 4)."""
    abar = sampler.alphas_cumprod[0]
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def repaint(sampler: Sampler, model_fn: ModelFn, x_T: Tensor, known: Tensor, mask: Tensor,
            prediction_type: str | Prediction = "epsilon", *, generator: torch.Generator | None = None,
            resample: int = 1, callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Inpainting by RePaint (Lugmayr et al. 2022, Algorithm 1) on the grid of a DDIM or DDPM sampler.

    ``known``: x0 (B, ...) in the diffusion space; ``mask``: 1 where to generate, 0 where ``known`` is kept,
    broadcastable to it. At every step the unknown part takes the sampler's step (DDIM, Song et al. 2021
    Eq. 12, with the sampler's eta; DDPM: eta = 1, the posterior with variance beta_tilde) and the known part is
    ``known`` re-noised to the new timestep with fresh noise, x = sqrt(abar) known + sqrt(1 - abar) z; the
    two are joined by the mask. ``resample`` = U > 1 repeats each step U times, going back between repeats by
    q(x_t | x_prev) = N(sqrt(abar_t / abar_prev) x_prev, (1 - abar_t / abar_prev) I) (RePaint's resampling with
    jump length 1), which lets the generated part harmonise with the known part. The last step lands on the
    clean level, so the result equals ``known`` exactly where mask = 0.
    """
    if isinstance(sampler, DDIMSampler):
        eta = sampler.eta
    elif isinstance(sampler, DDPMSampler):
        eta = 1.0
    else:
        raise ValueError(f"inpainting runs RePaint's DDPM / DDIM steps: use sampler=ddim or sampler=ddpm, "
                         f"not {sampler.name}")
    if resample < 1:
        raise ValueError(f"resample must be >= 1 (1: no resampling), got {resample}")
    denoise = sampler.denoiser(model_fn, prediction_type, x_T)
    x = sampler.state(x_T)
    known, mask = known.to(x), mask.to(x)
    abars = sampler.alphas_cumprod
    for i, t in sampler.steps(progress):
        abar_t, abar_prev = abars[i], abars[i + 1]
        for u in range(resample):
            x0, eps = denoise(x, i)
            std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
            generated = abar_prev**0.5 * x0 + max(1 - abar_prev - std**2, 0.0) ** 0.5 * eps
            if std > 0:
                generated = generated + std * sampler.noise_like(x, generator)
            kept = abar_prev**0.5 * known
            if abar_prev < 1:
                kept = kept + (1 - abar_prev) ** 0.5 * sampler.noise_like(x, generator)
            x_prev = mask * generated + (1 - mask) * kept
            if u < resample - 1:  # back up one step and redo it
                ratio = abar_t / abar_prev
                x = ratio**0.5 * x_prev + (1 - ratio) ** 0.5 * sampler.noise_like(x, generator)
        x = x_prev
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x.to(x_T.dtype)
