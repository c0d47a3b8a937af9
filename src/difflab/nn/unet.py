"""The UNet denoiser (Ho et al. 2020; Dhariwal & Nichol 2021; Rombach et al. 2022) with swappable
time embedding and time injection, self-attention, cross-attention to a context and class conditioning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab.nn.attention import SelfAttentionBlock, TransformerBlock, heads_for
from difflab.nn.embeddings import TIME_EMBEDDINGS, ClassEmbedding, conditioning_vector
from difflab.nn.hub import HUB
from difflab.nn.layers import group_norm, zero_module

TIME_INJECTIONS = ("add", "concat", "film", "adagn")


class ResBlock(nn.Module):
    """norm -> SiLU -> conv -> [time injection] -> norm -> SiLU -> dropout -> conv (zero-init), plus a
    residual (1x1-projected when the channel count changes).

    time_injection:
      add     h = conv1(...) + W emb                         (DDPM)
      concat  W emb broadcast over H x W, concatenated to conv2's input as extra channels
      film    h = norm2(h) * (1 + gamma) + beta              (ADM's scale-shift norm)
      adagn   h = GroupNorm_no_affine(h) * (1 + gamma) + beta: the norm's only affine comes from emb
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, time_injection: str = "film",
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        if time_injection not in TIME_INJECTIONS:
            raise ValueError(f"unknown time_injection {time_injection!r}; valid: {', '.join(TIME_INJECTIONS)}")
        self.time_injection = time_injection
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # add puts W emb before norm2: with one channel per group (16 channels, norm_groups 32) the norm would remove
        # it and the block would be blind to t, so its groups hold at least two channels
        self.norm2 = group_norm(out_channels, groups, affine=time_injection != "adagn",
                                min_group_size=2 if time_injection == "add" else 1)
        emb_out = {"add": out_channels, "concat": max(out_channels // 4, 1), "film": 2 * out_channels,
                   "adagn": 2 * out_channels}[time_injection]
        self.emb_proj = nn.Linear(embed_dim, emb_out)
        conv2_in = out_channels + (emb_out if time_injection == "concat" else 0)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(conv2_in, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.time_injection == "add":
            h = F.silu(self.norm2(h + e))
        elif self.time_injection == "concat":
            h = F.silu(self.norm2(h))
            h = torch.cat([h, e.expand(-1, -1, *h.shape[-2:])], dim=1)
        else:  # film, adagn: scale-shift after the norm
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))  # one fused op instead of mul + add
        return self.skip(x) + self.conv2(self.dropout(h))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, *args) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a conv; ``size`` lets odd sizes (28 -> 14 -> 7 -> 4) round-trip."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class Layer(nn.ModuleList):
    """A ResBlock optionally followed by an attention block, applied in order with the shared inputs."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for block in self:
            x = block(x, emb, context, context_mask)
        return x


class UNet(nn.Module, PyTorchModelHubMixin, **HUB):
    """A UNet for epsilon / x0 / v prediction: forward(x (B, C, H, W), t (B,)) -> (B, out_channels, H, W)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,  # default: in_channels
        model_channels: int = 64,  # channels at full resolution
        channel_mult: Sequence[int] = (1, 2, 2),  # per level; each level after the first halves H and W
        num_res_blocks: int = 2,  # ResBlocks per level on the way down (one more on the way up)
        attention_resolutions: Sequence[int] = (2,),  # downsampling factors that get attention (1 = full res)
        dropout: float = 0.0,
        num_heads: int | None = 4,  # heads per attention block, unless head_dim is given
        head_dim: int | None = None,  # channels per head; overrides num_heads
        time_embedding: str = "sinusoidal_mlp",  # sinusoidal | learned | sinusoidal_mlp
        time_injection: str = "film",  # add | concat | film | adagn
        num_timesteps: int = 1000,  # size of the learned time-embedding table
        mid_attention: bool = True,  # attention in the middle block
        context_dim: int | None = None,  # set: attention blocks become transformer blocks with cross-attention
        num_classes: int | None = None,  # set: class embedding (+ a null class) added to the time embedding
        cond_dim: int | None = None,  # set: a conditioning vector (e.g. pooled text) added to the time embedding
        norm_groups: int = 32,
        gradient_checkpointing: bool = False,  # recompute each layer in backward to save activation memory
        channels_last: bool = False,  # NHWC memory format for parameters and input
        attention_implementation: str = "auto",  # self-attention: auto | sdpa | channels_first (see attention.py)
        decoder: bool = True,  # False: the encoder half + pooled linear head -> (B, out_channels) logits (ADM's
        # noisy classifier for classifier guidance)
    ):
        super().__init__()
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time_embedding {time_embedding!r}; valid: {', '.join(TIME_EMBEDDINGS)}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        embed_dim = 4 * model_channels
        self.time_embed = TIME_EMBEDDINGS[time_embedding](embed_dim, num_timesteps=num_timesteps,
                                                          base_dim=model_channels)
        self.class_embed = ClassEmbedding(num_classes, embed_dim) if num_classes else None
        self.cond_proj = nn.Linear(cond_dim, embed_dim) if cond_dim else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, time_injection, dropout, norm_groups)

        def attn(channels: int) -> nn.Module:
            heads = heads_for(channels, num_heads, head_dim)
            if context_dim is not None:
                return TransformerBlock(channels, heads, context_dim, norm_groups)
            return SelfAttentionBlock(channels, heads, norm_groups, attention_implementation)

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layer = Layer([res(ch, mult * model_channels)])
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layer.append(attn(ch))
                self.down.append(layer)
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                ds *= 2
        self.mid = Layer([res(ch, ch)] + ([attn(ch)] if mid_attention else []) + [res(ch, ch)])
        self.up = nn.ModuleList()
        self.decoder = decoder
        for level, mult in reversed(list(enumerate(channel_mult)) if decoder else []):
            for _ in range(num_res_blocks + 1):
                layer = Layer([res(ch + skip_channels.pop(), mult * model_channels)])
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layer.append(attn(ch))
                self.up.append(layer)
            if level > 0:
                self.up.append(Upsample(ch))
                ds //= 2
        if decoder:
            self.out = nn.Sequential(group_norm(ch, norm_groups), nn.SiLU(),
                                     zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)))
        else:
            self.out = nn.Sequential(group_norm(ch, norm_groups), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(ch, self.out_channels))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def embed(self, t: Tensor, class_labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """The vector every ResBlock is conditioned on: time embedding (+ class) (+ projected cond)."""
        return conditioning_vector(self.time_embed, self.class_embed, self.cond_proj, t, class_labels, cond)

    def _run(self, layer: nn.Module, *args) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, x: Tensor, t: Tensor, *, class_labels: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,) timesteps; class_labels: (B,) with ``num_classes`` meaning null;
        context: (B, L, context_dim) with context_mask (B, L) True for real tokens; cond: (B, cond_dim)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.embed(t, class_labels, cond).to(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.mid, h, emb, context, context_mask)
        if not self.decoder:
            return self.out(h)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
            else:
                h = self._run(layer, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)
