"""Image files into the tensors the models take: one way to read and fit an image to a model's channels and
resolution, used by the image-folder dataset, sample.py's editing inputs and evaluate.py's sample folders (so real
and generated images are compared as the same kind of tensor)."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import v2

from difflab.data.layout import IMAGE_SUFFIXES
from difflab.errors import UsageError


class UnreadableImageError(OSError, ValueError):
    """An image file PIL cannot decode (both an OSError, as PIL's own, and a ValueError: a bad input); ``path``
    names it (``data.on_error=skip`` counts the files by it)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = path


# Refused from the header, before a pixel is decoded: a 101-byte 1x20000 PNG would become a 20000x32 (or, resized
# for a larger model, far bigger) tensor, and PIL's own bomb check only looks at the pixel count.
MAX_PIXELS = 1 << 26  # 67 megapixels: an 8192 x 8192 photograph
MAX_ASPECT_RATIO = 16.0  # longer side / shorter side: wide panoramas pass, strips of pixels do not
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def read_image(path: str | Path, channels: int, max_pixels: int | None = MAX_PIXELS,
               max_aspect_ratio: float | None = MAX_ASPECT_RATIO) -> Tensor:
    """An image file as uint8 (channels, H, W): converted to grayscale (1) or RGB (3); one larger than
    ``max_pixels`` or more elongated than ``max_aspect_ratio`` is refused as unreadable (None: no limit)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return _decode(path, channels, path, max_pixels, max_aspect_ratio)


def decode_image(data: bytes, channels: int, name: str, max_pixels: int | None = MAX_PIXELS,
                 max_aspect_ratio: float | None = MAX_ASPECT_RATIO) -> Tensor:
    """Encoded image bytes (a tar shard's member) as uint8 (channels, H, W); ``name`` says where they came from."""
    return _decode(io.BytesIO(data), channels, name, max_pixels, max_aspect_ratio)


def _decode(file, channels: int, name: str | Path, max_pixels: int | None, max_aspect_ratio: float | None) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(file) as img:
            _check_size(img.size, name, max_pixels, max_aspect_ratio)
            if img.mode in SIXTEEN_BIT_MODES:  # PIL's convert("L") clips 16-bit values at 255 instead of scaling
                img = _eight_bit(img)
            return pil_to_tensor(img.convert("L" if channels == 1 else "RGB"))  # decodes every pixel
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports some corrupt files (a PNG chunk's bad checksum) as SyntaxError or ValueError
        if isinstance(err, UnreadableImageError):
            raise
        raise UnreadableImageError(f"cannot read image {name}: {err}", path=name) from err


def _check_size(size: tuple[int, int], name, max_pixels: int | None, max_aspect_ratio: float | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise UnreadableImageError(f"image {name} is {width}x{height} pixels, more than max_pixels={max_pixels:,} "
                                   "(raise data.dataset.max_pixels, for shards data.max_pixels, to read it)", path=name)
    ratio = max(width, height) / max(1, min(width, height))
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        raise UnreadableImageError(f"image {name} is {width}x{height} pixels, an aspect ratio of {ratio:g}, more than "
                                   f"max_aspect_ratio={max_aspect_ratio:g} (raise data.dataset.max_aspect_ratio, for "
                                   "shards data.max_aspect_ratio, to read it)", path=name)


def _eight_bit(img):
    """A 16-bit grayscale image as 8-bit grayscale, 0..65535 scaled to 0..255 (rounded)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), mode="L")


def fit_transform(size: int, channels: int, random_flip: bool = False) -> v2.Compose:
    """uint8 (C, H, W) -> float (C, size, size) in [-1, 1]: the shorter side resized to ``size``, centre-cropped
    (the training data's transform, and diffusers' image pipelines')."""
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       *([v2.RandomHorizontalFlip()] if random_flip else []),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels)])


def load_image(path: str | Path, channels: int, size: int) -> Tensor:
    """An image file as (1, channels, size, size) in [-1, 1], fitted like the training data."""
    return fit_transform(size, channels)(read_image(path, channels)).unsqueeze(0)


@dataclass
class FolderImages:
    """Images read from a folder, with what was done to them: ``resized`` counts the original sizes (H, W) that
    were not the target's."""

    images: Tensor  # (N, C, size, size) in [-1, 1]
    resized: Counter = field(default_factory=Counter)

    def notes(self, size: int) -> list[str]:
        return [f"resized {count} image(s) of {h}x{w} to {size}x{size} (shorter side, centre crop)"
                for (h, w), count in sorted(self.resized.items())]


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder of samples, sorted by name (``grid.png``, a grid of them, left out)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem != "grid")
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def load_images(folder: str | Path, channels: int, size: int, n: int | None = None) -> FolderImages:
    """The images of a folder (sorted by name; ``grid.png`` skipped), the first ``n`` or all, fitted to
    ``channels`` x ``size`` x ``size`` like the training data."""
    files = image_files(folder)
    files = files[:n] if n is not None else files
    transform, out = fit_transform(size, channels), FolderImages(torch.empty(0))
    images = []
    for path in files:
        pixels = read_image(path, channels)
        if tuple(pixels.shape[-2:]) != (size, size):
            out.resized[tuple(pixels.shape[-2:])] += 1
        images.append(transform(pixels))
    out.images = torch.stack(images)
    return out


def is_grayscale(images: Tensor, tolerance: float = 2 / 255) -> bool:
    """Whether images (N, C, H, W) in [-1, 1] hold no colour: one channel, or channels equal to within a grey level
    (of the [0, 1] scale)."""
    return images.shape[1] == 1 or bool((images - images.mean(1, keepdim=True)).abs().max() <= tolerance * 2)


def load_mask(path: str | Path, size: int) -> Tensor:
    """An inpainting mask as (1, 1, size, size) in {0, 1}: white (>= 50 % grey) marks what to regenerate, black
    what to keep (the convention of diffusers' inpainting pipelines)."""
    mask = read_image(path, 1)
    transform = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True)])
    return (transform(mask) >= 0.5).float().unsqueeze(0)
