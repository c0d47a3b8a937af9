"""Latent diffusion's first stages: frozen autoencoders between images and the diffusion's latents."""

from difflab.latent.first_stage import AutoencoderFirstStage, DiffusersFirstStage, FirstStage, load_first_stage

__all__ = ["AutoencoderFirstStage", "DiffusersFirstStage", "FirstStage", "load_first_stage"]
