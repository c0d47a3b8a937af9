"""The LightningModule that trains a denoiser: network + noise schedule + objective + EMA + sampler."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from difflab.diffusion import DiffusionLoss, LossWeighting, NoiseSchedule, Prediction, Sampler


class DiffusionModule(L.LightningModule):
    """Trains ``network`` to denoise under ``schedule``; validates, samples and exports with EMA weights.

    The EMA copy (``self.ema``) is a frozen submodule: it is saved in every checkpoint with its update
    count (``ema_updates``), restored on resume, has no gradients (so DDP never syncs it), and is updated
    after each optimizer step as ema = d ema + (1 - d) theta with d = min(ema_decay, (1 + n) / (10 + n))
    when ``ema_warmup`` (the warm-up of diffusers' EMAModel), n = number of updates so far.
    """

    def __init__(
        self,
        network: nn.Module,  # forward(x_t, t) -> prediction
        schedule: NoiseSchedule,
        sampler: Callable[[NoiseSchedule], Sampler],  # partial sampler, completed with the schedule
        prediction: Prediction,  # what the network predicts
        loss_weighting: LossWeighting,
        optimizer: Callable[..., torch.optim.Optimizer],  # partial: optimizer(params)
        lr_scheduler: Callable[..., Any] | None = None,  # partial: lr_scheduler(optimizer), stepped per step
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        image_shape: Sequence[int] = (1, 32, 32),  # (C, H, W) of generated samples
        loss_buckets: int = 10,  # train/loss_t<k> is logged for this many equal ranges of t
        run_config: dict | None = None,  # the composed run config, stored in checkpoints for sample.py
        compile: bool | dict = False,  # torch.compile the training forward; a dict is passed as its kwargs
    ):
        super().__init__()
        self.network = network
        self.ema = copy.deepcopy(network).requires_grad_(False).eval()
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.schedule = schedule
        self.sampler = sampler(schedule)
        self.loss = DiffusionLoss(prediction, loss_weighting)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.image_shape = tuple(image_shape)
        self.loss_buckets = loss_buckets
        self.run_config = run_config
        self.compile = compile

    # ---- training -------------------------------------------------------------------------------

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.network(x_t, t)

    @property
    def train_network(self) -> nn.Module:
        """The network the training step calls: ``torch.compile(network)`` when ``compile`` is set. The compiled
        wrapper is kept out of the module tree, so checkpoints, EMA and DDP see the plain network."""
        if not self.compile:
            return self.network
        if "_compiled_network" not in self.__dict__:
            kwargs = {} if self.compile is True else dict(self.compile)
            self.__dict__["_compiled_network"] = torch.compile(self.network, **kwargs)
        return self.__dict__["_compiled_network"]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.loss(self.train_network, batch["image"], self.schedule)
        self.log("train/loss", out.loss, prog_bar=True)
        bucket = (out.t * self.loss_buckets // self.schedule.num_timesteps).detach()
        losses = out.per_sample.detach()
        sums = torch.zeros(self.loss_buckets, device=losses.device).index_add_(0, bucket, losses)
        counts = torch.bincount(bucket, minlength=self.loss_buckets)
        for k in counts.nonzero().flatten().tolist():
            self.log(f"train/loss_t{k}", sums[k] / counts[k], batch_size=int(counts[k]))
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.network.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    def optimizer_step(self, *args, **kwargs) -> None:
        # here rather than in on_train_batch_end, which runs after the checkpoint callback's
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n)) if self.ema_warmup else self.ema_decay
        ema_params, params = list(self.ema.parameters()), list(self.network.parameters())
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.network.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.ema_updates += 1

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.network.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    # ---- validation and sampling with the EMA weights --------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        # fixed t and noise per batch, so that the figure is comparable across validations
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        out = self.loss(self.ema, batch["image"], self.schedule, generator=generator)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return out.loss

    @torch.no_grad()
    def generate(self, n: int, *, sampler: Sampler | None = None, generator: torch.Generator | None = None,
                 progress: bool = False, use_ema: bool = True) -> Tensor:
        """n samples (n, C, H, W) in [-1, 1] from the EMA weights with the configured (or given) sampler."""
        network = self.ema if use_ema else self.network
        was_training = network.training
        network.eval()
        device = self.device
        gen_device = generator.device if generator is not None else device
        x_T = torch.randn((n, *self.image_shape), generator=generator, device=gen_device).to(device)
        samples = (sampler or self.sampler).sample(network, x_T, prediction_type=self.loss.prediction,
                                                   generator=generator, progress=progress)
        network.train(was_training)
        return samples.clamp(-1, 1)

    # ---- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["difflab_config"] = self.run_config
