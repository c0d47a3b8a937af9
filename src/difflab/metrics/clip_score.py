"""CLIPScore (Hessel et al. 2021): how well images match their prompts, by a CLIP model's embeddings.

    scorer = CLIPScore.from_pretrained("openai/clip-vit-base-patch16")
    scores = scorer(images, prompts)     # images (B, C, H, W) in [-1, 1]; (B,) = 100 * max(cos(E_I, E_T), 0)

torchmetrics' ``CLIPScore`` has the same definition but reads ``get_image_features`` / ``get_text_features`` as
tensors, which transformers 5 returns wrapped in output objects (their projected embedding is the
``pooler_output``); this wrapper takes either.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.errors import UsageError
from difflab.extras import require


def _embedding(output) -> Tensor:
    """A projected CLIP embedding from ``get_*_features``: a tensor (transformers 4) or an output object (5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


class CLIPScore(nn.Module):
    """Per-sample CLIPScore of images against prompts, with a frozen transformers CLIP model and processor."""

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name_or_path: str = "openai/clip-vit-base-patch16",
                        local_files_only: bool = False) -> CLIPScore:
        transformers = require("transformers", "text", "CLIPScore (clip_model=)")
        try:
            model = transformers.CLIPModel.from_pretrained(name_or_path, local_files_only=local_files_only)
            processor = transformers.CLIPProcessor.from_pretrained(name_or_path, local_files_only=local_files_only)
        except OSError as err:
            raise UsageError(f"could not load a CLIP model from {name_or_path!r} (a hub id or a folder written by "
                             f"save_pretrained); offline, judge digits by class accuracy instead: {err}") from err
        return cls(model, processor)

    def train(self, mode: bool = True) -> CLIPScore:  # frozen: always in eval mode
        return super().train(False)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return 100 * self.cosine(images, prompts).clamp_min(0)

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """cos(E_image, E_text) per pair, (B,)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
        inputs = self.processor(text=list(prompts), images=list(pixels.cpu()), return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
        text = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                       attention_mask=inputs["attention_mask"].to(device)))
        return torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
