"""CLIPScore on a tiny randomly initialised CLIP saved to disk (no download; the ``tiny_clip`` fixture of
conftest.py), against the model's own normalised embeddings from its full forward."""

from __future__ import annotations

import pytest
import torch

from difflab.metrics.clip_score import CLIPScore

transformers = pytest.importorskip("transformers")


def test_clip_score_equals_the_models_own_cosine(tiny_clip):
    scorer = CLIPScore.from_pretrained(str(tiny_clip), local_files_only=True)
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a handwritten 7", "the digit one", "a 3", "nine", "zero", "a four", "digit 5", "an 8"]
    scores = scorer(images, prompts)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    inputs = scorer.processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)  # the full forward: normalised image_embeds and text_embeds
    cosine = (out.image_embeds * out.text_embeds).sum(-1)
    torch.testing.assert_close(scorer.cosine(images, prompts), cosine, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores, 100 * cosine.clamp_min(0), atol=1e-3, rtol=1e-4)
    assert scores.shape == (8,) and cosine.abs().min() > 1e-3  # a real comparison, not of zeros
    with pytest.raises(ValueError, match="8 images but 2 prompts"):
        scorer(images, prompts[:2])


def test_missing_clip_model_names_it(tmp_path):
    with pytest.raises(ValueError, match="could not load a CLIP model from .*nowhere"):
        CLIPScore.from_pretrained(str(tmp_path / "nowhere"), local_files_only=True)
