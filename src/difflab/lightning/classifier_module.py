"""The noisy classifier for classifier guidance (Dhariwal & Nichol 2021, section 4): a time-conditioned
encoder trained to predict the label of x_t at every noise level of the schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.diffusion import NoiseSchedule
from difflab.errors import UsageError
from difflab.lightning.base import DifflabModule


class NoisyClassifierModule(DifflabModule):
    """Cross-entropy of ``network(x_t, t) -> logits`` with t uniform and x_t from the forward process
    (``model=classifier``). Logs train/loss, train/acc, and val/acc_t<k> per range of t. Its checkpoint is
    what ``sample.py classifier_ckpt=PATH classifier_scale=s`` guides with."""

    def __init__(self, network: nn.Module, schedule: NoiseSchedule, optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable[..., Any] | None = None, buckets: int = 4, run_config: dict | None = None,
                 num_classes: int | None = None,  # the data's (null: unlabelled, refused); the network's outputs
                 clean: bool = False):  # clean images only: a classifier of samples (evaluate.py classifier=PATH)
        super().__init__(optimizer, lr_scheduler, run_config)
        if not num_classes:
            raise UsageError("model=classifier needs labelled data: class subfolders, or data.num_classes=K")
        if network.out_channels != num_classes:
            raise UsageError(f"the classifier network has {network.out_channels} outputs for {num_classes} classes")
        self.network, self.schedule = network, schedule
        self.buckets, self.clean = buckets, clean

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.network(x_t, t)

    def _noisy(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        x0, labels = batch["image"], torch.as_tensor(batch["label"], device=batch["image"].device)
        gen_device = generator.device if generator is not None else x0.device
        if self.clean:
            return x0, torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device), labels
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator,
                          device=gen_device).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        return self.schedule.add_noise(x0, noise, t), t, labels

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x_t, t, labels = self._noisy(batch)
        logits = self.network(x_t, t)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == labels).float().mean())
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        x_t, t, labels = self._noisy(batch, generator)
        correct = (self.network(x_t, t).argmax(-1) == labels).float()
        self.log("val/acc", correct.mean(), prog_bar=True, sync_dist=True, batch_size=len(labels))
        bucket = t * self.buckets // self.schedule.num_timesteps
        for k in range(self.buckets):
            if (bucket == k).any():
                self.log(f"val/acc_t{k}", correct[bucket == k].mean(), sync_dist=True,
                         batch_size=int((bucket == k).sum()))

    def trainable_parameters(self):
        return self.network.parameters()
