"""Attention blocks for the UNet: spatial self-attention and LDM-style transformer blocks with cross-attention.

All attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from difflab.nn.layers import group_norm, zero_module


def heads_for(channels: int, num_heads: int | None, head_dim: int | None) -> int:
    """Number of heads from either ``num_heads`` or ``head_dim`` (exactly one is used; head_dim wins)."""
    if head_dim is not None:
        if channels % head_dim:
            raise ValueError(f"channels {channels} are not divisible by head_dim {head_dim}")
        return channels // head_dim
    heads = num_heads or 1
    if channels % heads:
        raise ValueError(f"channels {channels} are not divisible by num_heads {heads}")
    return heads


class Attention(nn.Module):
    """Multi-head attention of a token sequence to itself or to a context, with an optional key padding mask."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, dim); context: (B, L, context_dim); mask: (B, L) bool, True for real tokens."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SelfAttentionBlock(nn.Module):
    """Residual spatial self-attention (DDPM / ADM): x + proj(attention(GroupNorm(x)))."""

    def __init__(self, channels: int, heads: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.attn = Attention(channels, heads)
        zero_module(self.attn.to_out)

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        return x + rearrange(self.attn(tokens), "b (h w) c -> b c h w", h=h, w=w)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020), as in latent diffusion's transformer blocks."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Latent diffusion's spatial transformer (Rombach et al. 2022): self-attention, cross-attention to a
    context sequence with a key padding mask, and a feed-forward, each pre-LayerNorm and residual, between a
    GroupNorm + input projection and a zero-initialised output projection."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.self_attn = Attention(channels, heads)
        self.cross_attn = Attention(channels, heads, context_dim=context_dim)
        self.ff = FeedForward(channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        h, w = x.shape[-2:]
        tokens = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        tokens = tokens + self.self_attn(self.norm1(tokens))
        if context is not None:
            tokens = tokens + self.cross_attn(self.norm2(tokens), context, context_mask)
        tokens = tokens + self.ff(self.norm3(tokens))
        return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)
