"""The Diffusion Transformer (Peebles & Xie 2023): patchified tokens, blocks conditioned by adaLN-Zero on t (and a
class, a pooled text vector), optional cross-attention to text tokens as in PixArt-alpha (Chen et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab.nn.attention import Attention, heads_for
from difflab.nn.embeddings import TIME_EMBEDDINGS, ClassEmbedding, conditioning_vector
from difflab.nn.hub import HUB


def sincos_2d(dim: int, height: int, width: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE's, used by DiT): (height * width, dim), the first half encoding
    the column, the second the row, each as [sin, cos] of frequencies 10000^(-k / (dim / 4)). Written here since
    only diffusers (an optional extra) ships it."""
    if dim % 4:
        raise ValueError(f"DiT's hidden_size must be divisible by 4 for its 2-D position embedding, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample (DiT, Sec. 3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-LayerNorm self-attention and MLP with adaLN-Zero (shift, scale and a zero-initialised gate per branch,
    regressed from the conditioning vector); optionally a cross-attention to context tokens between them (PixArt,
    zero-initialised output)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.cross_attn = Attention(dim, heads, context_dim=context_dim) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear to patch pixels, zero-initialised (DiT's final layer)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module, PyTorchModelHubMixin, **HUB):
    """A DiT for eps / x0 / v / EDM / flow prediction, with the UNet's interface:
    forward(x (B, C, H, W), t (B,), *, class_labels, context, context_mask, cond) -> (B, out_channels, H, W).

    Images whose sides are not multiples of ``patch_size`` are zero-padded and the output cropped back.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,  # default: in_channels
        patch_size: int = 2,  # p: the image becomes (H / p) (W / p) tokens of p * p * C pixels
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int | None = 6,  # heads per attention, unless head_dim is given
        head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        time_embedding: str = "sinusoidal_mlp",  # sinusoidal | learned | sinusoidal_mlp (DiT's)
        frequency_dim: int = 256,  # sinusoidal_mlp: the sinusoid's width before the MLP (DiT's 256)
        num_timesteps: int = 1000,  # size of the learned time-embedding table
        num_classes: int | None = None,  # set: class embedding (+ a null class) added to t's
        cond_dim: int | None = None,  # set: a conditioning vector (e.g. pooled text) projected and added to t's
        context_dim: int | None = None,  # set: cross-attention to context tokens in every block (PixArt)
        gradient_checkpointing: bool = False,  # recompute each block in backward to save activation memory
    ):
        super().__init__()
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time_embedding {time_embedding!r}; valid: {', '.join(TIME_EMBEDDINGS)}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.gradient_checkpointing = gradient_checkpointing
        if hidden_size % 4:
            raise ValueError(f"DiT's hidden_size must be divisible by 4 (2-D position embedding), got {hidden_size}")
        heads = heads_for(hidden_size, num_heads, head_dim)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TIME_EMBEDDINGS[time_embedding](hidden_size, num_timesteps=num_timesteps,
                                                          base_dim=frequency_dim)
        self.class_embed = ClassEmbedding(num_classes, hidden_size) if num_classes else None
        self.cond_proj = nn.Linear(cond_dim, hidden_size) if cond_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (the patch embedding as a linear), N(0, 0.02) embeddings,
        and zeros for every adaLN regression, the final layer and (PixArt) the cross-attention outputs, so that
        each block starts as the identity and the output as 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.table.weight, std=0.02)
        if hasattr(self.t_embedder, "mlp"):
            for layer in self.t_embedder.mlp[0::2]:
                nn.init.normal_(layer.weight, std=0.02)
        elif hasattr(self.t_embedder, "table"):
            nn.init.normal_(self.t_embedder.table.weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.to_out)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def position_embedding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (height, width)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.hidden_size, height, width)
        return self._pos_cache[key].to(device=device, dtype=dtype)

    def embed(self, t: Tensor, class_labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """The vector every adaLN regresses from: time embedding (+ class) (+ projected cond), as the UNet's."""
        return conditioning_vector(self.t_embedder, self.class_embed, self.cond_proj, t, class_labels, cond)

    def forward(self, x: Tensor, t: Tensor, *, class_labels: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,) timesteps; class_labels: (B,) with ``num_classes`` meaning null;
        context: (B, L, context_dim) with context_mask (B, L) True for real tokens; cond: (B, cond_dim)."""
        height, width = x.shape[-2:]
        p = self.patch_size
        pad_h, pad_w = -height % p, -width % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        h = self.x_embedder(x)
        grid_h, grid_w = h.shape[-2:]
        tokens = rearrange(h, "b c h w -> b (h w) c")
        tokens = tokens + self.position_embedding(grid_h, grid_w, tokens.device, tokens.dtype)
        c = self.embed(t, class_labels, cond).to(tokens.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, context_mask)
        out = rearrange(self.final_layer(tokens, c), "b (h w) (p q c) -> b c (h p) (w q)", h=grid_h, w=grid_w,
                        p=p, q=p)
        return out[..., :height, :width]
