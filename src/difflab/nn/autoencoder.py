"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and Appendix G).

    autoencoder = Autoencoder(in_channels=1, channels=32, channel_mult=(1, 2, 2), latent_channels=4)
    posterior = autoencoder.encode(x)           # x: (B, 1, 32, 32) in [-1, 1]
    z = posterior.sample()                      # (B, 4, 8, 8): f = 2 ** (len(channel_mult) - 1) = 4
    x_hat = autoencoder.decode(z)

ResNet blocks without a time input, strided-conv downsampling, nearest-neighbour + conv upsampling, an
optional self-attention block at the bottleneck and a diagonal Gaussian posterior, as in LDM's ``Encoder`` /
``Decoder`` (the first stage of Stable Diffusion has the same shape with 128-512 channels and f = 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nn.attention import SelfAttentionBlock
from difflab.nn.layers import group_norm


class DiagonalGaussian:
    """A posterior N(mean, diag(exp(logvar))) from the encoder's 2C output channels (logvar clamped to
    [-30, 20] as in LDM, so that exp never over- or underflows)."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over the latent's elements: (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv -> norm -> SiLU -> dropout -> conv, plus a (1x1-projected) residual."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            group_norm(in_channels, groups), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels, groups), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


def _middle(channels: int, groups: int, attention: bool, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(channels, channels, groups, dropout),
                         *([SelfAttentionBlock(channels, heads=1, groups=groups)] if attention else []),
                         ResnetBlock(channels, channels, groups, dropout))


class Encoder(nn.Module):
    """x (B, C, H, W) -> posterior moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, in_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 latent_channels: int, groups: int = 32, mid_attention: bool = True, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        layers, ch = [], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(ch, channels * mult, groups, dropout))
                ch = channels * mult
            if level < len(channel_mult) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(ch, groups, mid_attention, dropout)
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mid(self.down(self.conv_in(x))))


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> x (B, C, h * f, w * f); the encoder's levels in reverse, one more
    ResnetBlock per level (as LDM's decoder)."""

    def __init__(self, out_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 latent_channels: int, groups: int = 32, mid_attention: bool = True, dropout: float = 0.0):
        super().__init__()
        ch = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = _middle(ch, groups, mid_attention, dropout)
        layers = []
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(ch, channels * channel_mult[level], groups, dropout))
                ch = channels * channel_mult[level]
            if level > 0:
                layers.append(_Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    @property
    def last_layer(self) -> nn.Parameter:
        """The output conv's weight: LDM balances the adversarial loss by the gradients it gets."""
        return self.out[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.up(self.mid(self.conv_in(z))))


class Autoencoder(nn.Module):
    """Encoder + diagonal Gaussian posterior + decoder; downsamples by f = 2 ** (len(channel_mult) - 1)."""

    def __init__(
        self,
        in_channels: int = 1,  # image channels (1: MNIST, 3: RGB)
        channels: int = 32,  # width of the first level
        channel_mult: Sequence[int] = (1, 2, 2),  # width multipliers per level; f = 2 ** (levels - 1)
        num_res_blocks: int = 1,  # ResnetBlocks per encoder level (decoder: one more)
        latent_channels: int = 4,
        norm_groups: int = 32,
        mid_attention: bool = True,  # self-attention at the bottleneck (LDM's first stages have it)
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        args = (channels, tuple(channel_mult), num_res_blocks, latent_channels, norm_groups, mid_attention, dropout)
        self.encoder = Encoder(in_channels, *args)
        self.decoder = Decoder(in_channels, *args)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        f = self.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {f}")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
