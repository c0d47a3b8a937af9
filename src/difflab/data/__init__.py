"""Data: image-caption datasets and the DataModule that splits and batches them."""

from difflab.data.datamodule import ImageCaptionDataModule
from difflab.data.datasets import ImageFolder, LabelledImages, digit_caption, digits, mnist

__all__ = ["ImageCaptionDataModule", "ImageFolder", "LabelledImages", "digit_caption", "digits", "mnist"]
