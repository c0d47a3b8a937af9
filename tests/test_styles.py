"""data.dataset.style: the digits restyled as a new domain from the same data (thick strokes, inverted)."""

from __future__ import annotations

import pytest
import torch

from difflab.data import digits, mnist


def test_thick_strokes_dilate_every_stroke_by_one_pixel():
    plain, thick = digits(8), digits(8, style="thick")
    assert thick.name == "sklearn_digits_thick" != plain.name
    image, bold = plain.images[0, 0], thick.images[0, 0]
    for i in range(8):
        for j in range(8):  # each pixel is the brightest of its 3x3 neighbourhood
            assert bold[i, j] == image[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].max()
    assert (thick.images >= plain.images).all() and thick.images.mean() > plain.images.mean() + 0.1


def test_inverted_digits_and_unknown_styles():
    torch.testing.assert_close(mnist(32, style="invert").images, -mnist(32).images)
    with pytest.raises(ValueError, match="valid: thick, invert"):
        digits(8, style="italic")
