"""Attention blocks for the UNet: spatial self-attention and LDM-style transformer blocks with cross-attention.

Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them), except the UNet's spatial self-attention on CPU, which uses :class:`ChannelsFirstAttention`
(see there for why).
"""

from __future__ import annotations

import math
import weakref

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


class ProbabilityStore:
    """Where :class:`ChannelsFirstAttention` keeps a block's softmax probabilities from the forward to the backward,
    one per attention block, reused step after step. Why: recomputing them in the backward costs as much as the
    forward's softmax (its ``exp`` is the largest part of this attention on CPU), and a fresh (heads, N, N) tensor
    each step costs more in page faults than the recomputation saves; a buffer allocated once costs neither
    (benchmark block: 71 ms forward + backward against 89 ms recomputing). The buffer is lent to one forward at a
    time (its graph's backward, or that graph being freed, returns it); a second forward before then gets a
    fresh tensor, and probabilities over ``budget_bytes`` are recomputed instead of stored."""

    def __init__(self, budget_bytes: int = 256 << 20):
        self.budget_bytes = budget_bytes
        self.buffer: Tensor | None = None
        self.borrower = None  # weak reference to the autograd context holding the buffer

    def lend(self, ctx, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
        if math.prod(shape) * like.element_size() > self.budget_bytes:
            return None
        if self.borrower is not None and self.borrower() is not None:  # in use by a graph not yet backpropagated
            return like.new_empty(shape)
        if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != like.dtype \
                or self.buffer.device != like.device:
            self.buffer = like.new_empty(shape)
        self.borrower = weakref.ref(ctx)
        return self.buffer

    def give_back(self, ctx) -> None:
        if self.borrower is not None and self.borrower() is ctx:
            self.borrower = None

    def __getstate__(self) -> dict:  # copies (EMA's deepcopy, pickling) start empty: the buffer is a cache
        return {"budget_bytes": self.budget_bytes, "buffer": None, "borrower": None}


class ChannelsFirstAttention(torch.autograd.Function):
    """Softmax attention on packed channels-first heads: ``qkv: (BH, 3D, N)`` (q, k, v of a head stacked
    along the channels, ADM's ``(heads 3 d)`` layout) -> ``(BH, D, N)``.

    ``out = v @ softmax(scale * q^T k)^T`` per head, as ADM's ``QKVAttentionLegacy`` (Dhariwal & Nichol 2021).
    Why hand-written: on CPU, SDPA's flash kernel and its math path are slow at the small heads of pixel UNets
    (8 channels per head at 16x16, batch 64: 132 ms forward + backward per block, against 71 ms here). Every
    product whose output has D rows is taken as ``(D, .) @ (., .)`` (4-5x faster in BLAS than ``(., .) @ (., D)``);
    the heads run in chunks whose score matrix stays in cache, in buffers allocated once; the packed layout needs
    no copies in or out; the probabilities are kept for the backward in a ``ProbabilityStore`` (or recomputed per
    chunk, as flash attention does, without one or over its budget). Agreement with SDPA is tested.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, scale: float, store: ProbabilityStore | None = None) -> Tensor:
        q, k, v = qkv.chunk(3, dim=1)
        out = q.new_empty(q.shape)
        kept = store.lend(ctx, (q.shape[0], q.shape[-1], k.shape[-1]), q) \
            if store is not None and ctx.needs_input_grad[0] else None
        for i, j, buffers in _chunks(q, k):
            probs = _probabilities(q[i:j], k[i:j], scale, buffers, None if kept is None else kept[i:j])
            torch.bmm(v[i:j], probs.mT, out=out[i:j])
        ctx.save_for_backward(qkv, out, kept)
        ctx.scale, ctx.store = scale, store
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qkv, out, kept = ctx.saved_tensors
        scale = ctx.scale
        q, k, v = qkv.chunk(3, dim=1)
        grad_out = grad_out.contiguous()
        # Softmax backward: dS = scale * P * (dP - rowsum(dP * P)) with dP = dO^T v. As in flash attention
        # (Dao et al. 2022, appendix B.2), rowsum(dP * P) = colsum(dO * O) over the head's D channels: a (D, N)
        # product instead of three passes over the (N, N) scores. ``scale`` is folded into a scaled copy of dO
        # (D x N) rather than applied to dS (N x N).
        rows = (grad_out * out).sum(1, keepdim=True).mT.mul_(scale)  # (BH, N, 1)
        scaled_grad = grad_out * scale
        # Separate contiguous gradients, concatenated at the end: bmm into a strided slice of one packed
        # gradient falls back to a per-matrix loop (3x slower).
        dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        for i, j, buffers in _chunks(q, k):
            probs = kept[i:j] if kept is not None else _probabilities(q[i:j], k[i:j], scale, buffers)
            torch.bmm(grad_out[i:j], probs, out=dv[i:j])
            ds = torch.bmm(scaled_grad[i:j].mT, v[i:j], out=buffers[0])  # scale * dP, in the free score buffer
            ds.sub_(rows[i:j]).mul_(probs)
            torch.bmm(k[i:j], ds.mT, out=dq[i:j])
            torch.bmm(q[i:j], ds, out=dk[i:j])
        if ctx.store is not None:
            ctx.store.give_back(ctx)
        return torch.cat((dq, dk, dv), dim=1), None, None


def _chunks(q: Tensor, k: Tensor):
    """Yield (start, stop, score buffer) over the heads. The two score-sized buffers are allocated once:
    fresh multi-MiB allocations in the loop cost more in page faults than the attention itself."""
    heads, queries, keys = q.shape[0], q.shape[-1], k.shape[-1]
    chunk = _chunk_size(queries, keys)
    buffers = q.new_empty((2, min(chunk, heads), queries, keys))
    for i in range(0, heads, chunk):
        j = min(i + chunk, heads)
        yield i, j, buffers[:, : j - i]


def _probabilities(q: Tensor, k: Tensor, scale: float, buffers: Tensor, out: Tensor | None = None) -> Tensor:
    """softmax(scale * q^T k) over the keys into ``out`` (default ``buffers[1]``); ``buffers[0]`` is scratch."""
    scores = buffers[0]
    torch.baddbmm(scores, q.mT, k, beta=0, alpha=scale, out=scores)
    return torch.softmax(scores, -1, out=buffers[1] if out is None else out)


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
        self.probability_store = ProbabilityStore()  # channels_first: the softmax kept for the backward

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        impl = self.implementation
        if impl == "auto":
            impl = "channels_first" if x.device.type == "cpu" and c // self.heads <= 8 else "sdpa"
        if impl == "channels_first":
            # (B, 3C, HW) as one batched product: a broadcast matmul runs as one big mm on transposed operands
            # and copies its output back to this layout (forward and backward; 1.6x slower)
            qkv = torch.bmm(self.qkv.weight.to(x.dtype).expand(b, 3 * c, c), self.norm(x).flatten(2))
            out = ChannelsFirstAttention.apply(qkv.view(b * self.heads, -1, h * w), (c // self.heads) ** -0.5,
                                               self.probability_store)
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
