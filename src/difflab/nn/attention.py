"""Attention blocks for the UNet: spatial self-attention and LDM-style transformer blocks with cross-attention.

Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them), except the UNet's spatial self-attention on CPU, which uses :class:`ChannelsFirstAttention`
(see there for why).
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


def _chunk_size(queries: int, keys: int) -> int:
    """Heads per chunk so that one chunk's (queries x keys) score matrix is about 4 MiB: it stays in cache."""
    return max(1, (1 << 20) // (queries * keys))


class ChannelsFirstAttention(torch.autograd.Function):
    """Softmax attention on packed channels-first heads: ``qkv: (BH, 3D, N)`` (q, k, v of a head stacked
    along the channels, ADM's ``(heads 3 d)`` layout) -> ``(BH, D, N)``.

    ``out = v @ softmax(scale * q^T k)^T`` per head, as ADM's ``QKVAttentionLegacy`` (Dhariwal & Nichol 2021).
    Why hand-written: on CPU, SDPA's flash kernel and its math path are slow at the small heads of pixel UNets
    (8 channels per head at 16x16, batch 64: ~220 ms forward + backward per block, a third of a training step
    of the benchmark UNet). Here every product whose output has D rows is taken as ``(D, .) @ (., .)`` (4-5x faster
    in BLAS than ``(., .) @ (., D)``); the heads run in chunks whose score matrix stays in cache, in buffers
    allocated once; the packed layout needs no copies in or out; and the backward recomputes the
    probabilities per chunk instead of storing them (as flash attention does). Agreement with SDPA is tested.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, scale: float) -> Tensor:
        q, k, v = qkv.chunk(3, dim=1)
        out = q.new_empty(q.shape)
        for i, j, buffers in _chunks(q, k):
            probs = _probabilities(q[i:j], k[i:j], scale, buffers)
            torch.bmm(v[i:j], probs.mT, out=out[i:j])
        ctx.save_for_backward(qkv)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (qkv,) = ctx.saved_tensors
        scale = ctx.scale
        q, k, v = qkv.chunk(3, dim=1)
        grad_out = grad_out.contiguous()
        # Separate contiguous gradients, concatenated at the end: bmm into a strided slice of one packed
        # gradient falls back to a per-matrix loop (3x slower).
        dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        ds_buffer, row_buffer = None, None
        for i, j, buffers in _chunks(q, k):
            probs = _probabilities(q[i:j], k[i:j], scale, buffers)
            do = grad_out[i:j]
            torch.bmm(do, probs, out=dv[i:j])
            # Softmax backward: dS = P * (dP - rowsum(dP * P)) with dP = dO^T v, in reused buffers.
            if ds_buffer is None:
                ds_buffer, row_buffer = torch.empty_like(probs), probs.new_empty(probs.shape[:-1] + (1,))
            ds, rows = ds_buffer[: j - i], row_buffer[: j - i]
            torch.bmm(do.mT, v[i:j], out=ds)
            torch.sum(buffers[0].copy_(ds).mul_(probs), -1, keepdim=True, out=rows)
            ds.sub_(rows).mul_(probs).mul_(scale)
            torch.bmm(k[i:j], ds.mT, out=dq[i:j])
            torch.bmm(q[i:j], ds, out=dk[i:j])
        return torch.cat((dq, dk, dv), dim=1), None


def _chunks(q: Tensor, k: Tensor):
    """Yield (start, stop, score buffer) over the heads. The two score-sized buffers are allocated once:
    fresh multi-MiB allocations in the loop cost more in page faults than the attention itself."""
    heads, queries, keys = q.shape[0], q.shape[-1], k.shape[-1]
    chunk = _chunk_size(queries, keys)
    buffers = q.new_empty((2, min(chunk, heads), queries, keys))
    for i in range(0, heads, chunk):
        j = min(i + chunk, heads)
        yield i, j, buffers[:, : j - i]


def _probabilities(q: Tensor, k: Tensor, scale: float, buffers: Tensor) -> Tensor:
    """softmax(scale * q^T k) over the keys into ``buffers[1]``; ``buffers[0]`` is left free as scratch."""
    scores, probs = buffers[0], buffers[1]
    torch.baddbmm(scores, q.mT, k, beta=0, alpha=scale, out=scores)
    return torch.softmax(scores, -1, out=probs)


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
    """Residual spatial self-attention (DDPM / ADM): x + proj(attention(GroupNorm(x))).

    ``implementation``: ``sdpa`` (token layout, ``F.scaled_dot_product_attention``), ``channels_first``
    (:class:`ChannelsFirstAttention`, no layout changes at all) or ``auto``: channels_first on CPU for heads of
    at most 8 channels, sdpa otherwise. Both compute the same function of the same weights. Measured on 2 CPU
    cores, block forward + backward at batch 64 (sdpa / channels_first): 8-channel heads at 16x16 292 / 196 ms,
    at 8x8 46 / 42 ms; 16-channel heads at 16x16 74 / 101 ms; 32-channel heads at 16x16 73 / 89 ms.
    """

    def __init__(self, channels: int, heads: int, groups: int = 32, implementation: str = "auto"):
        super().__init__()
        if implementation not in ("auto", "sdpa", "channels_first"):
            raise ValueError(f"unknown attention implementation {implementation!r}; "
                             "valid: 'auto', 'sdpa', 'channels_first'")
        self.heads = heads
        self.implementation = implementation
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        impl = self.implementation
        if impl == "auto":
            impl = "channels_first" if x.device.type == "cpu" and c // self.heads <= 8 else "sdpa"
        if impl == "channels_first":
            qkv = torch.matmul(self.qkv.weight.to(x.dtype), self.norm(x).flatten(2))  # (B, 3C, HW)
            out = ChannelsFirstAttention.apply(qkv.view(b * self.heads, -1, h * w), (c // self.heads) ** -0.5)
            out = torch.baddbmm(self.proj.bias[:, None].to(x.dtype), self.proj.weight.to(x.dtype).expand(b, c, c),
                                out.view(b, c, h * w))
            return x + out.view(b, c, h, w)
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        q, k, v = rearrange(self.qkv(tokens), "b n (heads three d) -> three b heads n d", three=3, heads=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b heads n d -> b n (heads d)")
        return x + rearrange(self.proj(out), "b (h w) c -> b c h w", h=h, w=w)


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
