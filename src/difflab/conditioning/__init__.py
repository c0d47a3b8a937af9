"""Conditioning: what the denoiser is told besides x_t and t (``conditioning`` config group)."""

from difflab.conditioning.base import (
    ClassConditioner,
    Condition,
    Conditioner,
    MultiConditioner,
    NoConditioning,
    concat_conditions,
    pad_tokens,
)
from difflab.conditioning.text import TextConditioner, TextEncoder, clip, minilm, pretrained

__all__ = ["ClassConditioner", "Condition", "Conditioner", "MultiConditioner", "NoConditioning", "TextConditioner",
           "TextEncoder", "clip", "concat_conditions", "minilm", "pad_tokens", "pretrained"]
