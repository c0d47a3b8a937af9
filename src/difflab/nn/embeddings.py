"""Embeddings of the timestep and of class labels, each mapping to a vector of ``embed_dim``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer positional encoding of t (Vaswani et al. 2017, Sec. 3.5), as in DDPM: (B,) -> (B, dim).

    The first half is cos, the second sin, with frequencies max_period^(-i / half) (ADM / diffusers
    ``flip_sin_to_cos=True, downscale_freq_shift=0``).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class SinusoidalTimeEmbedding(nn.Module):
    """Fixed sinusoidal encoding of t, no parameters."""

    def __init__(self, embed_dim: int, num_timesteps: int = 1000, base_dim: int | None = None):
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.embed_dim)


class LearnedTimeEmbedding(nn.Module):
    """A trainable table with one vector per training timestep; a fractional t (a sampler's sigma grid falls
    between timesteps) gets the linear interpolation of the two rows around it."""

    def __init__(self, embed_dim: int, num_timesteps: int = 1000, base_dim: int | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.table = nn.Embedding(num_timesteps, embed_dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return self.table(t)
        low = t.floor().long().clamp(0, self.table.num_embeddings - 1)
        high = (low + 1).clamp(max=self.table.num_embeddings - 1)
        w = (t - low).clamp(0, 1).to(self.table.weight.dtype)[:, None]
        return (1 - w) * self.table(low) + w * self.table(high)


class SinusoidalMLPTimeEmbedding(nn.Module):
    """Sinusoidal encoding of t followed by Linear -> SiLU -> Linear (DDPM, ADM, LDM; the default)."""

    def __init__(self, embed_dim: int, num_timesteps: int = 1000, base_dim: int | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.base_dim = base_dim or embed_dim // 4
        self.mlp = nn.Sequential(nn.Linear(self.base_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.base_dim).to(self.mlp[0].weight.dtype))


TIME_EMBEDDINGS: dict[str, type[nn.Module]] = {
    "sinusoidal": SinusoidalTimeEmbedding,
    "learned": LearnedTimeEmbedding,
    "sinusoidal_mlp": SinusoidalMLPTimeEmbedding,
}


class ClassEmbedding(nn.Module):
    """Label embedding with one extra learned row, index ``num_classes``, for the null (unconditional) class."""

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor) -> Tensor:
        return self.table(labels.long())


def conditioning_vector(time_embed: nn.Module, class_embed: ClassEmbedding | None, cond_proj: nn.Module | None,
                        t: Tensor, class_labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
    """What a network is conditioned on, one vector per sample: the time embedding, plus the class's (the null
    class when no label is given), plus the projected conditioning vector (e.g. pooled text) when given."""
    emb = time_embed(t)
    if class_embed is not None:
        if class_labels is None:  # unconditional: the null class
            class_labels = torch.full_like(t, class_embed.null_class, dtype=torch.long)
        emb = emb + class_embed(class_labels)
    if cond_proj is not None and cond is not None:
        emb = emb + cond_proj(cond)
    return emb
