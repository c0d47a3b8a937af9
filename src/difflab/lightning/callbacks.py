"""Callbacks: sample grids written during training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from difflab.files import atomic_write


class Periodic(L.Callback):
    """Calls ``run(trainer, pl_module)`` every ``every_n_steps`` optimizer steps (0: never) and once more at the
    end of training, unless it just ran at that step. Every rank calls it (DDP-safe when ``run`` is)."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule):
        raise NotImplementedError

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule):
        self._last_step = trainer.global_step
        return self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._run(trainer, pl_module)


class SampleGrid(Periodic):
    """Every ``every_n_steps`` optimizer steps (and at the end of training) write a grid of the module's
    ``preview(n, seed)`` (EMA samples; the autoencoder's reconstructions; images in [0, 1]) to
    ``<run dir>/samples/step_XXXXXX.png`` and hand it to the loggers that take images."""

    def __init__(self, every_n_steps: int = 500, num_samples: int = 64, seed: int = 0, dirname: str = "samples"):
        super().__init__(every_n_steps)
        self.num_samples = num_samples
        self.seed = seed
        self.dirname = dirname

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        return self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        if not hasattr(pl_module, "preview"):  # e.g. the noisy classifier: nothing to draw
            return None
        # every rank samples: no collective may run on rank 0 alone
        samples = pl_module.preview(self.num_samples, seed=self.seed)
        return None if samples is None else save_and_log_grid(trainer, samples, self.dirname, "samples")


@rank_zero_only
def save_and_log_grid(trainer: L.Trainer, images: torch.Tensor, dirname: str, key: str) -> Path:
    """Write images (N, C, H, W) in [0, 1] as a square grid to ``<run dir>/<dirname>/step_XXXXXX.png``
    (atomically) and hand it to the loggers that take images (W&B, TensorBoard) under ``key``."""
    grid = make_grid(images.float().cpu(), nrow=int(len(images) ** 0.5), padding=2, pad_value=1.0)
    path = Path(trainer.default_root_dir) / dirname / f"step_{trainer.global_step:06d}.png"
    with atomic_write(path) as tmp:  # a viewer never sees a half-written grid
        save_image(grid, tmp)
    log_image(trainer, key, grid)
    return path


def log_image(trainer: L.Trainer, key: str, image: torch.Tensor) -> None:
    """Hand an image (C, H, W) in [0, 1] to the loggers that take images (W&B, TensorBoard) at the current step."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # W&B
            logger.log_image(key, [image], step=trainer.global_step)
            continue
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image(key, image, trainer.global_step)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without the "Epoch 13/-2" it shows for runs bounded by steps or time
    (``max_epochs=-1``): there the description is just "Epoch 13"."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs == -1:
            description = description.replace(f"Epoch {current_epoch}/-2", f"Epoch {current_epoch}", 1)
        return description
