"""LightningDataModule over any image-caption dataset, with a seeded train/validation split."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, random_split

from difflab.data.unreadable import CountsSkippedFiles, SkippedFiles, SkipUnreadable, check_on_error, collate_skipped
from difflab.errors import UsageError


class ImageCaptionDataModule(CountsSkippedFiles, L.LightningDataModule):
    """Splits ``dataset`` into train/val with a fixed seed and serves batches of {image, label, caption}; with
    ``on_error="skip"`` an unreadable image is replaced by the next readable one of its split and counted
    (``difflab.data.unreadable``)."""

    def __init__(
        self,
        dataset: Dataset,  # yields {"image": (C, H, W) in [-1, 1], "label": int, "caption": str}
        image_size: int = 32,  # side of the (square) images; the model reads it for its sample shape
        batch_size: int = 64,
        val_fraction: float = 0.05,  # share held out for validation
        split_seed: int = 0,  # the split is the same for every run with this seed
        num_workers: int = 0,  # in-memory datasets are fastest with 0 on small machines
        root: str | None = None,  # folder datasets: where the files are (`data.root=DIR`), passed on to them
        num_classes: int | None = None,  # labelled datasets: how many classes (conditioning=class reads it)
        channels: int | None = None,  # image channels (the networks' configs read it)
        class_names: list[str] | None = None,  # labelled datasets: the classes' names (conditioning=class reads them)
        on_error: str = "raise",  # an unreadable image: raise (naming it) | skip (replace it in its batch, count it)
        max_skip_fraction: float = 0.01,  # on_error=skip: stop once more than this share of the files is unreadable
    ):
        super().__init__()
        self.channels, self.num_classes, self.class_names = channels, num_classes, class_names
        if not 0 < val_fraction < 1:
            raise UsageError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.dataset = dataset
        self.root = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        n_val = max(1, round(len(dataset) * val_fraction))
        self.train_set, self.val_set = random_split(dataset, [len(dataset) - n_val, n_val],
                                                    generator=torch.Generator().manual_seed(split_seed))
        check_on_error(on_error, max_skip_fraction)
        self.on_error = on_error
        if on_error == "skip":  # Subsets still: the FID callback and evaluation read them by index too
            self.train_set, self.val_set = (SkipUnreadable(split.dataset, split.indices)
                                            for split in (self.train_set, self.val_set))
            self.skipped = SkippedFiles(max_skip_fraction, str(root or getattr(dataset, "root", "DIR")),
                                        total=len(dataset))
        if len(self.train_set) < batch_size:
            raise UsageError(f"the training split has {len(self.train_set)} images, fewer than one batch "
                             f"(data.batch_size={batch_size}); lower data.batch_size")

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, drop_last=train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipped if self.on_error == "skip" else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
