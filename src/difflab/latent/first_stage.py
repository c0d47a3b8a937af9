"""First stages of latent diffusion: frozen maps between images in [-1, 1] and the diffusion's latents.

    load_first_stage(ckpt="outputs/.../last.ckpt")        # difflab's autoencoder (python train.py model=autoencoder)
    load_first_stage(pretrained="stabilityai/sd-vae-ft-mse")  # a diffusers AutoencoderKL, hub id or local folder

Latents are z = scale_factor * (posterior sample - shift_factor) (Rombach et al. 2022, Sec. 4.3.2 and
Appendix G: the scale gives the diffusion unit-variance inputs; Stable Diffusion's VAE uses 0.18215,
SD3 / FLUX add a shift). ``spec()`` is an instantiable config of the architecture without its weights: a
latent-diffusion checkpoint stores it, and its own state dict carries the weights, so a trained LDM
samples without the first stage's original file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from difflab.errors import UsageError
from difflab.extras import require
from difflab.nn.autoencoder import Autoencoder
from difflab.registry import MODEL_PARTS, build, describe


class FirstStage(nn.Module):
    """Base: subclasses give ``moments`` (the posterior's mean and std) and ``decode_latents``."""

    in_channels: int
    latent_channels: int
    downsampling_factor: int

    def __init__(self, scale_factor: float, shift_factor: float = 0.0):
        super().__init__()
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)

    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The unscaled posterior's mean and std for images (B, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Unscaled latents -> images (roughly in [-1, 1])."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def scaled_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior of the diffusion's latents: (scale (mean - shift), scale std)."""
        mean, std = self.moments(images)
        return (mean - self.shift_factor) * self.scale_factor, std * self.scale_factor

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """images (B, C, H, W) in [-1, 1] -> diffusion latents (B, latent_channels, H / f, W / f); the posterior
        mean unless ``sample`` (training draws from the posterior, as LDM does)."""
        mean, std = self.scaled_moments(images)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.decode_latents(latents / self.scale_factor + self.shift_factor)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.downsampling_factor
        if image_size % f:
            raise ValueError(f"image size {image_size} is not divisible by the first stage's downsampling factor {f}")
        return self.latent_channels, image_size // f, image_size // f

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, latent_channels={self.latent_channels}, "
                f"f={self.downsampling_factor}, scale_factor={self.scale_factor:.5g}, "
                f"shift_factor={self.shift_factor:.5g}")


class AutoencoderFirstStage(FirstStage):
    """difflab's KL autoencoder (``model=autoencoder``), with the scale factor its training estimated."""

    def __init__(self, autoencoder: Autoencoder, scale_factor: float, autoencoder_config: dict | None = None):
        super().__init__(scale_factor)
        self.autoencoder = autoencoder
        self.autoencoder_config = autoencoder_config  # the instantiable node that built it, for spec()
        self.in_channels = autoencoder.in_channels
        self.latent_channels = autoencoder.latent_channels
        self.downsampling_factor = autoencoder.downsampling_factor

    @classmethod
    def from_checkpoint(cls, path: str | Path, scale_factor: float | None = None,
                        trust: Sequence[str] = ()) -> AutoencoderFirstStage:
        """Load a ``python train.py model=autoencoder`` checkpoint; ``scale_factor`` overrides the stored one. Its
        classes must be difflab's own unless ``trust`` names them (``first_stage.trust=[mypkg.]``)."""
        from difflab.loading import autoencoder_of

        config, weights, stored_scale = autoencoder_of(path, trust)
        stage = cls.from_config(config, stored_scale if scale_factor is None else scale_factor, trust)
        stage.autoencoder.load_state_dict(weights)
        return stage

    @classmethod
    def from_config(cls, autoencoder: dict, scale_factor: float, trust: Sequence[str] = ()) -> AutoencoderFirstStage:
        """The architecture from its stored config node, randomly initialised (weights come from a state dict); built
        by ``registry.build``, as the node comes from a file."""
        autoencoder = _plain(autoencoder)
        return cls(build(autoencoder, MODEL_PARTS, trust, "the first stage's autoencoder"), scale_factor,
                   autoencoder_config=autoencoder)

    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.autoencoder.encode(images)
        return posterior.mean, posterior.std

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents)

    def spec(self) -> dict[str, Any]:
        return describe(AutoencoderFirstStage.from_config, recursive=False, autoencoder=self.autoencoder_config,
                        scale_factor=self.scale_factor)


class DiffusersFirstStage(FirstStage):
    """A diffusers ``AutoencoderKL`` (Stable Diffusion's VAE and kin): ``pip install 'difflab[diffusers]'``."""

    def __init__(self, vae: nn.Module, scale_factor: float | None = None, shift_factor: float | None = None):
        config = vae.config
        super().__init__(config.scaling_factor if scale_factor is None else scale_factor,
                         (getattr(config, "shift_factor", None) or 0.0) if shift_factor is None else shift_factor)
        self.vae = vae
        self.in_channels = config.in_channels
        self.latent_channels = config.latent_channels
        self.downsampling_factor = 2 ** (len(config.block_out_channels) - 1)

    @staticmethod
    def _autoencoder_kl():
        return require("diffusers", "diffusers", "first_stage.pretrained").AutoencoderKL

    @classmethod
    def from_pretrained(cls, name_or_path: str, subfolder: str | None = None, scale_factor: float | None = None,
                        shift_factor: float | None = None, local_files_only: bool = False) -> DiffusersFirstStage:
        """A hub id (``stabilityai/sd-vae-ft-mse``; ``subfolder="vae"`` inside a pipeline repo) or a local folder
        written by ``AutoencoderKL.save_pretrained``."""
        autoencoder_kl = cls._autoencoder_kl()
        try:
            vae = autoencoder_kl.from_pretrained(name_or_path, subfolder=subfolder, local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            raise UsageError(f"could not load a diffusers AutoencoderKL from {name_or_path!r}"
                             f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {err}") from err
        return cls(vae, scale_factor, shift_factor)

    @classmethod
    def from_config(cls, config: dict, scale_factor: float, shift_factor: float) -> DiffusersFirstStage:
        return cls(cls._autoencoder_kl().from_config(_plain(config)), scale_factor, shift_factor)

    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents).sample

    def spec(self) -> dict[str, Any]:
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.vae.config).items()}
        return describe(DiffusersFirstStage.from_config, recursive=False, config=config,
                        scale_factor=self.scale_factor, shift_factor=self.shift_factor)


def _plain(config: dict | DictConfig) -> dict:
    """A config as plain Python containers (what torch.load(weights_only=True) and diffusers take)."""
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def load_first_stage(ckpt: str | None = None, pretrained: str | None = None, subfolder: str | None = None,
                     scale_factor: float | None = None, shift_factor: float | None = None,
                     local_files_only: bool = False, trust: Sequence[str] = ()) -> FirstStage:
    """The first stage named by exactly one of ``ckpt`` (difflab's autoencoder) or ``pretrained`` (diffusers);
    ``trust``: classes of your own that the checkpoint ``ckpt`` may name."""
    if (ckpt is None) == (pretrained is None):
        raise UsageError(
            "model=ldm needs exactly one first stage: first_stage.ckpt=PATH (a checkpoint of python train.py "
            "model=autoencoder) or first_stage.pretrained=PATH_OR_HUB_ID (a diffusers AutoencoderKL, e.g. "
            "stabilityai/sd-vae-ft-mse)" + ("; both were given" if ckpt is not None else ""))
    if ckpt is not None:
        return AutoencoderFirstStage.from_checkpoint(ckpt, scale_factor, trust)
    return DiffusersFirstStage.from_pretrained(pretrained, subfolder, scale_factor, shift_factor, local_files_only)
