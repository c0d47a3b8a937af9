"""Data: image-caption datasets and the DataModules that split and batch them (DreamBooth's among them)."""

from difflab.data.datamodule import ImageCaptionDataModule
from difflab.data.datasets import ImageFolder, LabelledImages, digit_caption, digits, mnist
from difflab.data.dreambooth import DreamBoothDataModule

__all__ = ["DreamBoothDataModule", "ImageCaptionDataModule", "ImageFolder", "LabelledImages", "digit_caption",
           "digits", "mnist"]
