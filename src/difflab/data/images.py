"""Reading single images and masks from disk into the tensors the models take (sample.py's editing inputs)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import v2


def _read(path: str | Path, mode: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return pil_to_tensor(img.convert(mode))
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def load_image(path: str | Path, channels: int, size: int) -> Tensor:
    """An image file as (1, channels, size, size) in [-1, 1]: resized (shorter side) and centre-cropped like
    the training data."""
    image = _read(path, "L" if channels == 1 else "RGB")
    transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True)])
    return (transform(image) * 2 - 1).unsqueeze(0)


def load_mask(path: str | Path, size: int) -> Tensor:
    """An inpainting mask as (1, 1, size, size) in {0, 1}: white (>= 50 % grey) marks what to regenerate, black
    what to keep (the convention of diffusers' inpainting pipelines)."""
    mask = _read(path, "L")
    transform = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True)])
    return (transform(mask) >= 0.5).float().unsqueeze(0)
