"""Cross-attention maps: where in the image each prompt token is attended to (as prompt-to-prompt's heat-maps,
Hertz et al. 2022), from the softmax of every cross-attention layer of the UNet.

Each prompt's image is generated (or given), noised to several t, and run through the network under the prompt;
the attention probabilities over the prompt's tokens are averaged over heads, upsampled from each layer's
resolution to the image's and averaged over layers and t. At every pixel the maps of a prompt's tokens sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from difflab.conditioning.base import MultiConditioner
from difflab.conditioning.text import TextConditioner
from difflab.errors import UsageError
from difflab.nn.attention import TransformerBlock
from difflab.pipeline import Pipeline
from difflab.probe.common import fixed_noise, network_input, noised


@dataclass
class CrossAttentionMaps:
    """``maps[i]``: (tokens of prompt i, H, W) attention mass per token and pixel; ``tokens[i]`` the token strings
    (special tokens included, padding not); ``images``: (P, C, H, W) in [0, 1], the images probed."""

    prompts: list[str]
    tokens: list[list[str]]
    maps: list[Tensor]
    images: Tensor
    timesteps: list[int]

    def to_dict(self) -> dict:
        return {"probe": "cross_attention", "prompts": self.prompts, "tokens": self.tokens,
                "timesteps": self.timesteps, "maps": [m.tolist() for m in self.maps]}

    def table(self) -> str:
        """Per prompt, the tokens with the share of the image's attention each receives."""
        lines = ["| prompt | attention share per token |", "|---|---|"]
        for prompt, tokens, maps in zip(self.prompts, self.tokens, self.maps, strict=True):
            share = maps.mean(dim=(1, 2)).tolist()
            lines.append(f"| {prompt} | " + ", ".join(f"{tok} {s:.2f}" for tok, s in zip(tokens, share, strict=True))
                         + " |")
        return "\n".join(lines) + "\n"

    def figure(self, title: str = ""):
        from difflab.plots import cross_attention_figure

        return cross_attention_figure(self, title=title)


def text_part(pipe: Pipeline) -> TextConditioner:
    conditioner = pipe.conditioner
    parts = conditioner.parts.values() if isinstance(conditioner, MultiConditioner) else [conditioner]
    text = next((part for part in parts if isinstance(part, TextConditioner)), None)
    layers = [m for m in pipe.network.modules() if isinstance(m, TransformerBlock)]
    if text is None or not layers:
        raise UsageError("probe=cross_attention needs a text-conditioned model with cross-attention "
                         "(conditioning=text or class_text); this one has none")
    return text


@torch.no_grad()
def cross_attention(pipe: Pipeline, prompts: str | Sequence[str], images: Tensor | None = None,
                    timesteps: Sequence[int] = (100, 300, 500, 700), seed: int = 0, steps: int | None = None,
                    label: int | None = None) -> CrossAttentionMaps:
    """Maps for each prompt, on ``images`` (P, C, H, W) in [0, 1] or, by default, on the pipeline's sample for the
    prompt (seed ``seed``, ``steps`` sampler steps; ``label`` too for class_text models)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    text = text_part(pipe)
    device = pipe.device
    if images is None:
        images = pipe(n=1, prompt=prompts, label=None if label is None else [label] * len(prompts), seed=seed,
                      steps=steps, progress=False)
    x0 = pipe.encode(images.to(device) * 2 - 1)
    layers = [m for m in pipe.network.modules() if isinstance(m, TransformerBlock)]
    size = x0.shape[-2:]
    captured: list[Tensor] = []

    def capture(module, args) -> None:
        x, context, mask = args[0], args[1], args[2] if len(args) > 2 else None
        q = rearrange(module.to_q(x), "b n (h d) -> b h n d", h=module.heads)
        k = rearrange(module.to_kv(context).chunk(2, dim=-1)[0], "b l (h d) -> b h l d", h=module.heads)
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        probabilities = scores.softmax(-1).mean(1)  # (B, N, L), averaged over heads
        side = int(round(probabilities.shape[1] ** 0.5))
        maps = rearrange(probabilities, "b (h w) l -> b l h w", h=side)
        captured.append(F.interpolate(maps, size=size, mode="bilinear", align_corners=False))

    hooks = [layer.cross_attn.register_forward_pre_hook(capture) for layer in layers]
    was_training = pipe.network.training
    pipe.network.eval()
    all_maps, all_tokens = [], []
    try:
        for i, prompt in enumerate(prompts):
            condition = {k: v.to(device) for k, v in text.encode([prompt], device).items()}
            if isinstance(pipe.conditioner, MultiConditioner):  # the other parts at their null (or the label)
                others = pipe.conditioner.from_request(labels=None if label is None else [label],
                                                       prompts=[prompt], device=device)
                condition = {**others, **condition}
            captured.clear()
            for t in timesteps:
                x_t = noised(pipe, x0[i:i + 1], t, fixed_noise(x0[i:i + 1].shape, seed + t, device))
                pipe.network(network_input(pipe, x_t, t), torch.full((1,), t, device=device), **condition)
            length = int(condition["context_mask"][0].sum())
            all_maps.append(torch.stack(captured).mean(0)[0, :length].cpu())
            all_tokens.append(_tokens(text, prompt, length))
    finally:
        for hook in hooks:
            hook.remove()
        pipe.network.train(was_training)
    return CrossAttentionMaps(prompts, all_tokens, all_maps, images.cpu(), list(timesteps))


def _tokens(text: TextConditioner, prompt: str, length: int) -> list[str]:
    encoder = text.encoder
    ids = encoder.tokenizer([prompt], truncation=True, max_length=encoder.max_length)["input_ids"][0]
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids)
    return (tokens + [f"<{k}>" for k in range(len(tokens), length)])[:length]
