"""The LightningModule that trains a denoiser: network + noise schedule + objective + EMA; hands out a Pipeline."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.conditioning.base import Conditioner
from difflab.diffusion.guidance import Conditioned
from difflab.diffusion.losses import Loss
from difflab.diffusion.objectives import DiffusionLoss, LossWeighting
from difflab.diffusion.parameterization import Prediction
from difflab.diffusion.samplers import Sampler
from difflab.diffusion.schedules import NoiseSchedule
from difflab.lightning.base import DifflabModule
from difflab.lightning.compat import logs_this_step
from difflab.loading import store_architectures, upgrade_checkpoint
from difflab.model import DiffusionModel
from difflab.nn.lora import LoRA, load_base, save_adapter
from difflab.pipeline import Pipeline


class DiffusionModule(DifflabModule):
    """Trains the ``DiffusionModel`` it holds (``self.model``: ``network`` under ``schedule`` and ``prediction``,
    with its conditioner, sampler and guidance); adds the loss, the EMA, the optimizer and logging, validates with
    the EMA weights and hands out ``diffusion_model()`` / ``pipeline()`` for sampling with them.

    The EMA copy (``self.ema``) of the network is a frozen submodule: it is saved in every checkpoint with its
    update count (``ema_updates``), restored on resume, has no gradients (so DDP never syncs it), and is updated
    after each optimizer step as ema = d ema + (1 - d) theta with d = min(ema_decay, (1 + n) / (10 + n))
    when ``ema_warmup`` (the warm-up of diffusers' EMAModel), n = number of updates so far.
    """

    def __init__(
        self,
        network: nn.Module,  # forward(x_t, t) -> prediction
        schedule: NoiseSchedule,
        sampler: Sampler,  # the default sampler of sample grids and of the pipeline
        prediction: Prediction,  # what the network predicts
        loss_weighting: LossWeighting,
        optimizer: Callable[..., torch.optim.Optimizer] | None,  # partial: optimizer(params); None: no training
        lr_scheduler: Callable[..., Any] | None = None,  # partial: lr_scheduler(optimizer), stepped per step
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        image_shape: Sequence[int] | None = (1, 32, 32),  # (C, H, W) of generated samples
        loss_buckets: int = 10,  # train/loss_t<k> is logged for this many equal ranges of t
        run_config: dict | None = None,  # the composed run config, stored in checkpoints for sample.py
        compile: bool | dict = False,  # torch.compile the training forward; a dict is passed as its kwargs
        conditioner: Conditioner | None = None,  # class / text conditioning with condition dropout; None: none
        guidance_scale: float = 1.0,  # classifier-free guidance for previews (sample grids, generate's default)
        timestep_sampler: Callable[..., Tensor] | None = None,  # how training draws t; None: uniform
        loss: Loss | None = None,  # distance and noise options (offset noise, input perturbation); None: L2
        finetune: LoRA | None = None,  # finetune=lora: adapters trained on a frozen network (from finetune.base)
        first_stage: nn.Module | None = None,  # LatentDiffusionModule: the frozen first stage
        image_size: int | None = None,  # LatentDiffusionModule: the pixel resolution
    ):
        super().__init__(optimizer, lr_scheduler, run_config)
        self.finetune = finetune
        if finetune is not None:
            if finetune.base is not None:
                load_base(network, finetune.base, finetune.trust)
            finetune.apply(network)
        self.model = DiffusionModel(network, schedule, prediction, sampler, conditioner,
                                    guidance_scale=guidance_scale, image_shape=image_shape, first_stage=first_stage,
                                    image_size=image_size)
        self.ema = copy.deepcopy(network).requires_grad_(False).eval()
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.loss = DiffusionLoss(prediction, loss_weighting, timestep_sampler, loss)
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.loss_buckets = loss_buckets
        self.compile = compile

    # the model's parts, read where training needs them
    network = property(lambda self: self.model.network)
    schedule = property(lambda self: self.model.schedule)
    sampler = property(lambda self: self.model.sampler)
    conditioner = property(lambda self: self.model.conditioner)
    guidance_scale = property(lambda self: self.model.guidance_scale)
    image_shape = property(lambda self: self.model.image_shape)
    first_stage = property(lambda self: self.model.first_stage)

    def diffusion_input(self, batch: dict) -> Tensor:
        """The x0 that training diffuses: the batch's images (a first stage's latents in LatentDiffusionModule)."""
        return batch["image"]

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
        condition = self.conditioner.training_condition(batch)  # null with probability drop_prob
        out = self.loss(Conditioned(self.train_network, condition), self.diffusion_input(batch), self.schedule,
                        sample_weight=batch.get("loss_weight"))  # DreamBooth: instance and prior-class terms
        self.log("train/loss", out.loss, prog_bar=True)
        if self._logging_step():
            self._log_loss_buckets(out)
        return out.loss

    def _logging_step(self) -> bool:
        """Whether the loggers write this step (every ``log_every_n_steps``): the per-bucket losses and the
        gradient norm are computed only then, as on other steps they would be computed and dropped."""
        return logs_this_step(self._trainer)

    def _log_loss_buckets(self, out) -> None:
        bucket = (out.t * self.loss_buckets // self.schedule.num_timesteps).long().detach()
        losses = out.per_sample.detach()
        sums = torch.zeros(self.loss_buckets, device=losses.device).index_add_(0, bucket, losses)
        counts = torch.bincount(bucket, minlength=self.loss_buckets)
        for k in counts.nonzero().flatten().tolist():
            self.log(f"train/loss_t{k}", sums[k] / counts[k], batch_size=int(counts[k]))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step():
            return
        norms = [p.grad.detach().norm() for p in self.network.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    def optimizer_step(self, *args, **kwargs) -> None:
        # here rather than in on_train_batch_end, which runs after the checkpoint callback's
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        super().optimizer_step(*args, **kwargs)
        # a step the non-finite guard skipped has no gradients left, and fp16's GradScaler lowers its scale on the
        # overflowing steps it skips: the EMA skips those too
        overflowed = scale is not None and scaler.get_scale() < scale
        if not overflowed and any(p.grad is not None for p in self.network.parameters()):
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        # Hand-written rather than Lightning's EMAWeightAveraging / torch.optim.swa_utils.AveragedModel: those use a
        # fixed decay (no diffusers-style warm-up) and swap the averaged weights in for validation, while the
        # pipeline, validation and checkpoints here use the EMA network beside the raw one (pipeline(use_ema=False)).
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n)) if self.ema_warmup else self.ema_decay
        ema_params, params = list(self.ema.parameters()), list(self.network.parameters())
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.network.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.ema_updates += 1

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)  # set by trainer=fsdp (Lightning's ModelParallelStrategy) only
        if mesh is not None:
            from difflab.lightning.fsdp import shard

            shard(self, mesh)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        prepare = getattr(self.trainer.datamodule, "prepare_class_images", None)
        if callable(prepare):  # data=dreambooth: the prior's class images, drawn by the model before it is tuned
            if self.trainer.is_global_zero:
                prepare(self.pipeline())
            self.trainer.strategy.barrier()

    def trainable_parameters(self):
        return [p for p in self.network.parameters() if p.requires_grad]  # finetune=lora: the adapters only

    def on_train_end(self) -> None:
        if self.finetune is not None and self.trainer.is_global_zero:  # the EMA's adapters, alone
            save_adapter(self.ema, self.finetune, Path(self.trainer.default_root_dir) / "lora" / "adapter.safetensors")

    # ---- validation and sampling with the EMA weights --------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        # fixed t and noise per batch, so that the figure is comparable across validations
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        out = self.loss(Conditioned(self.ema, self.conditioner(batch)), self.diffusion_input(batch), self.schedule,
                        generator=generator, train=False)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return out.loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        store_architectures(checkpoint, self.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(checkpoint)  # a checkpoint of an earlier layout resumes too

    def diffusion_model(self, use_ema: bool = True) -> DiffusionModel:
        """The trained model with its EMA (or raw) network: what sampling, export and evaluation take. It shares
        the module's weights (no copy)."""
        return self.model.with_network(self.ema) if use_ema else self.model

    def pipeline(self, use_ema: bool = True) -> Pipeline:
        """The Pipeline of ``diffusion_model(use_ema)``."""
        return self.diffusion_model(use_ema).pipeline()

    def preview(self, n: int, seed: int = 0) -> Tensor:
        """n EMA samples in [0, 1] for the sample-grid callback, under the conditioner's balanced examples (one row
        per class for class-conditional models) and the module's guidance."""
        return self.pipeline()(n, seed=seed, batch_size=n, progress=False)
