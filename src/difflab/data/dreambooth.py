"""DreamBooth (Ruiz et al. 2023): fine-tune a text-to-image model on a handful of images of one subject, every one
captioned with the same ``instance_prompt`` (a rare token and the class: "a photo of sks dog").

With ``class_prompt`` ("a photo of a dog"), prior preservation (their Eq. 2): every batch also holds as many images
of the class, drawn by the model itself before fine-tuning, and the loss is the instance loss plus
``prior_loss_weight`` times theirs, so the model keeps drawing other members of the class. The class images are
generated once into ``class_root`` (missing ones only: a rerun reuses them).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from difflab.data.images import fit_transform, image_files, read_image
from difflab.data.layout import NO_LABEL
from difflab.errors import UsageError


class DreamBoothDataset(Dataset):
    """Instance images (cycled), each paired with a class image when there are any: max(instances, class images)
    items, as diffusers' train_dreambooth.py."""

    def __init__(self, instance_files: list[Path], instance_prompt: str, class_files: list[Path],
                 class_prompt: str | None, image_size: int, channels: int, random_flip: bool):
        self.instance_files, self.class_files = instance_files, class_files
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.channels = channels
        self.transform = fit_transform(image_size, channels, random_flip)

    def __len__(self) -> int:
        return max(len(self.instance_files), len(self.class_files))

    def _image(self, path: Path) -> Tensor:
        return self.transform(read_image(path, self.channels))

    def __getitem__(self, index: int) -> dict:
        item = {"image": self._image(self.instance_files[index % len(self.instance_files)]),
                "caption": self.instance_prompt}
        if self.class_files:
            item.update(class_image=self._image(self.class_files[index % len(self.class_files)]),
                        class_caption=self.class_prompt)
        return item


def collate(items: list[dict], prior_loss_weight: float) -> dict:
    """One batch of the instance images followed by their class images, with per-sample ``loss_weight`` such that
    the batch's mean weighted loss is mean(instance losses) + prior_loss_weight * mean(class losses)."""
    images = [it["image"] for it in items] + [it["class_image"] for it in items if "class_image" in it]
    captions = [it["caption"] for it in items] + [it["class_caption"] for it in items if "class_image" in it]
    n, total = len(items), len(images)
    weights = torch.cat([torch.ones(n), torch.full((total - n,), float(prior_loss_weight))]) * (total / n)
    return {"image": torch.stack(images), "caption": captions, "loss_weight": weights,
            "label": torch.full((total,), NO_LABEL, dtype=torch.long)}


class DreamBoothDataModule(L.LightningDataModule):
    """``data=dreambooth``: the subject's images with one prompt, and (with ``class_prompt``) the class images the
    model draws of itself before training (``prepare_class_images``, called by the module when fitting starts).
    Validation measures the loss on the instance images."""

    def __init__(self, instance_root: str, instance_prompt: str, class_prompt: str | None = None,
                 class_root: str | None = None, num_class_images: int = 100, prior_loss_weight: float = 1.0,
                 image_size: int = 512, channels: int = 3, batch_size: int = 1, num_workers: int = 2,
                 random_flip: bool = True, class_batch_size: int = 4, seed: int = 0, num_classes: None = None):
        super().__init__()
        if num_classes is not None:
            raise UsageError("data=dreambooth is text-conditioned: leave data.num_classes null (conditioning=text)")
        self.instance_files = image_files(instance_root)  # fails naming the folder when it has no images
        if not instance_prompt or not isinstance(instance_prompt, str):
            raise UsageError("data.instance_prompt is empty: give the subject's prompt (\"a photo of sks dog\")")
        if class_prompt and class_root is None:
            raise UsageError("prior preservation (data.class_prompt) needs data.class_root=DIR: where the class "
                             "images are (or are generated)")
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt or None
        self.class_root = Path(class_root).expanduser() if class_root else None
        self.num_class_images, self.prior_loss_weight = int(num_class_images), float(prior_loss_weight)
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip
        self.batch_size, self.num_workers = batch_size, num_workers
        self.class_batch_size, self.seed = class_batch_size, seed
        self.num_classes, self.class_names = None, None  # what the run's conditioning reads of a datamodule

    def class_files(self) -> list[Path]:
        """The class images there are, at most num_class_images of them."""
        if self.class_prompt is None or not self.class_root.is_dir() or not any(self.class_root.iterdir()):
            return []
        return image_files(self.class_root)[:self.num_class_images]

    def prepare_class_images(self, pipeline) -> list[Path]:
        """Draw the missing class images with ``pipeline`` (the model before fine-tuning) under ``class_prompt``;
        returns the files written. Seeded by index: an interrupted run continues where it stopped."""
        if self.class_prompt is None:
            return []
        have = len(self.class_files())
        if have >= self.num_class_images:
            return []
        self.class_root.mkdir(parents=True, exist_ok=True)
        written = []
        for start in range(have, self.num_class_images, self.class_batch_size):
            n = min(self.class_batch_size, self.num_class_images - start)
            images = pipeline(n=n, prompt=self.class_prompt, seed=self.seed + start, batch_size=n, progress=False)
            names = [f"class_{start + k:05d}.png" for k in range(n)]
            written += pipeline.save(images, self.class_root, names)
            print(f"prior preservation: {start + n}/{self.num_class_images} class images in {self.class_root}")
        return written

    def _dataset(self) -> DreamBoothDataset:
        class_files = self.class_files()
        if self.class_prompt is not None and len(class_files) < self.num_class_images:
            raise UsageError(f"{self.class_root} holds {len(class_files)} class images of {self.num_class_images}: "
                             "they are drawn when fitting starts (DiffusionModule.on_fit_start)")
        return DreamBoothDataset(self.instance_files, self.instance_prompt, class_files, self.class_prompt,
                                 self.image_size, self.channels, self.random_flip)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          collate_fn=partial(collate, prior_loss_weight=self.prior_loss_weight),
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        instances = DreamBoothDataset(self.instance_files, self.instance_prompt, [], None, self.image_size,
                                      self.channels, random_flip=False)
        return DataLoader(instances, batch_size=self.batch_size, collate_fn=partial(collate, prior_loss_weight=0.0))
