"""What a trained diffusion model is (after diffusers' ModelMixin): a plain ``nn.Module`` holding the network with
its schedule, parameterisation, conditioner, default sampler and guidance, and for latent models the first stage.
Training wraps one (``DiffusionModule``); the Pipeline, export, evaluation, the probes and the callbacks take one;
``difflab.loading`` alone reads and writes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from difflab.conditioning.base import Conditioner, NoConditioning
from difflab.diffusion.parameterization import Prediction
from difflab.diffusion.samplers import Sampler
from difflab.diffusion.schedules import NoiseSchedule

if TYPE_CHECKING:
    from difflab.pipeline import Pipeline


class DiffusionModel(nn.Module):
    """``network(x_t, t, **condition)`` under ``schedule`` and ``prediction``, conditioned by ``conditioner``,
    sampled by default with ``sampler`` at ``guidance_scale``; ``first_stage`` (latent diffusion) maps images of
    ``image_size`` pixels to its latents and back. ``run_config``: the config it was trained with (a plain dict;
    what a checkpoint stores), or None."""

    def __init__(self, network: nn.Module, schedule: NoiseSchedule, prediction: Prediction, sampler: Sampler,
                 conditioner: Conditioner | None = None, *,
                 guidance_scale: float = 1.0,  # classifier-free guidance w of samples by default (1: none)
                 image_shape: Sequence[int] | None = (1, 32, 32),  # (C, H, W) of the diffusion space (pixel models)
                 first_stage: nn.Module | None = None,  # latent models: encode / decode / latent_shape, frozen
                 image_size: int | None = None,  # latent models: the pixel resolution
                 run_config: dict | None = None):
        super().__init__()
        self.network = network
        self.conditioner = conditioner if conditioner is not None else NoConditioning()
        self.schedule, self.prediction, self.sampler = schedule, prediction, sampler
        self.guidance_scale = float(guidance_scale)
        if first_stage is not None:
            self.first_stage = first_stage.requires_grad_(False).eval()
            image_shape = first_stage.latent_shape(image_size)
        else:
            self.first_stage = None
        self.image_shape = tuple(image_shape)
        self.image_size = image_size
        self.run_config = run_config

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the images the model makes: the diffusion space, or the first stage's pixels."""
        if self.first_stage is None:
            return self.image_shape
        return (self.first_stage.in_channels, self.image_size, self.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        if self.first_stage is not None:
            self.first_stage.eval()  # frozen: no dropout, no norm statistics updates
        return self

    def with_network(self, network: nn.Module) -> DiffusionModel:
        """The same model around another copy of its network (the EMA weights beside the trained ones); the other
        parts are shared, not copied."""
        return DiffusionModel(network, self.schedule, self.prediction, self.sampler, self.conditioner,
                              guidance_scale=self.guidance_scale, image_shape=self.image_shape,
                              first_stage=self.first_stage, image_size=self.image_size, run_config=self.run_config)

    def pipeline(self) -> Pipeline:
        """The Pipeline that samples and edits with this model (sharing its weights)."""
        from difflab.pipeline import Pipeline

        return Pipeline(self)
