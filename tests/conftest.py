"""Fixtures shared by several test modules."""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """difflab's cache (model=ldm's autoencoders) in a folder of this session, never the user's ~/.cache/difflab;
    the entry points run as subprocesses inherit it."""
    previous = os.environ.get("DIFFLAB_CACHE_DIR")
    os.environ["DIFFLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("difflab_cache"))
    yield
    if previous is None:
        os.environ.pop("DIFFLAB_CACHE_DIR", None)
    else:
        os.environ["DIFFLAB_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny randomly initialised CLIP model and processor (character-level tokenizer) written to a folder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [t + "</w>" for t in letters]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tokenizer)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"
