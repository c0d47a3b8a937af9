"""Models written by an earlier difflab (tests/legacy/README.md) still load and sample the same images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.loading import load

LEGACY = Path(__file__).parent / "legacy"
REQUEST = dict(n=2, label=[1, 2], steps=5, seed=0, progress=False)  # as make_legacy.py sampled them


@pytest.mark.parametrize("name,path", [("pixel_class", "pixel_class.ckpt"), ("latent_class", "latent_class.ckpt"),
                                       ("pixel_class_export", "pixel_class_export")])
def test_a_legacy_model_samples_what_it_sampled_when_written(name, path):
    expected = load_file(str(LEGACY / "samples.safetensors"))[name]
    images = load(LEGACY / path, device="cpu")(**REQUEST)
    assert images.shape == expected.shape == (4, 1, 8, 8)
    assert expected.std() > 0.05  # images, not a constant
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
