"""Latent diffusion (Rombach et al. 2022): the diffusion module on the latents of a frozen first stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.latent.first_stage import FirstStage
from difflab.lightning.diffusion_module import DiffusionModule


class LatentDiffusionModule(DiffusionModule):
    """``DiffusionModule`` whose diffusion runs on ``first_stage`` latents: training encodes each batch (a
    posterior sample, times the scale factor), sampling and editing decode at the end. The first stage is a
    frozen submodule: saved in the checkpoint with its architecture (``spec``), so the trained model samples
    without the autoencoder's original file; never optimised, never in train mode.

    ``cache_latents``: keep each training image's posterior (mean, std) in memory after its first encoding and
    draw z from it afterwards (for datasets without random augmentation; batches need their ``index``).
    """

    def __init__(self, first_stage: FirstStage, image_size: int, cache_latents: bool = False, **kwargs):
        kwargs["image_shape"] = first_stage.latent_shape(image_size)
        super().__init__(**kwargs)
        self.first_stage = first_stage.requires_grad_(False).eval()
        self.image_size = image_size
        self.cache_latents = cache_latents
        self._latent_cache: dict[int, tuple[Tensor, Tensor]] = {}
        network_channels = getattr(self.network, "in_channels", first_stage.latent_channels)
        if network_channels != first_stage.latent_channels:
            raise ValueError(f"the network takes {network_channels}-channel inputs but the first stage's latents have "
                             f"{first_stage.latent_channels} channels: set network.in_channels="
                             f"{first_stage.latent_channels}")

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.eval()  # frozen: no dropout, no norm statistics updates
        return self

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        return self.first_stage.in_channels, self.image_size, self.image_size

    # ---- the diffusion space ------------------------------------------------------------------------

    @torch.no_grad()
    def diffusion_input(self, batch: dict) -> Tensor:
        images = batch["image"]
        if not self.cache_latents:
            return self.first_stage.encode(images, sample=True)
        if "index" not in batch:
            raise ValueError("cache_latents needs the dataset index in each batch (batch['index'])")
        indices = batch["index"].tolist()
        missing = [k for k, i in enumerate(indices) if i not in self._latent_cache]
        if missing:
            mean, std = self.first_stage.scaled_moments(images[missing])
            for k, m, s in zip(missing, mean, std, strict=True):
                self._latent_cache[indices[k]] = (m, s)
        mean = torch.stack([self._latent_cache[i][0] for i in indices])
        std = torch.stack([self._latent_cache[i][1] for i in indices])
        return mean + std * torch.randn_like(mean)

    def encode(self, images: Tensor) -> Tensor:
        if images.shape[1:] != self.pixel_shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])}, the first stage expects {self.pixel_shape}")
        return self.first_stage.encode(images)

    def decode(self, x: Tensor) -> Tensor:
        return self.first_stage.decode(x).clamp(-1, 1)

    def latent_mask(self, mask: Tensor) -> Tensor:
        """A latent is regenerated if any pixel it covers is (max-pooling the pixel mask by f)."""
        f = self.first_stage.downsampling_factor
        return F.max_pool2d(mask, f) if f > 1 else mask

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["difflab_first_stage"] = self.first_stage.spec()
