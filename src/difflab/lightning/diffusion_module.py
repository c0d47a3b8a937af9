"""The LightningModule that trains a denoiser: network + noise schedule + objective + EMA + sampler."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from difflab.conditioning import Condition, Conditioner, NoConditioning
from difflab.diffusion import DiffusionLoss, LossWeighting, NoiseSchedule, Prediction, Sampler
from difflab.diffusion.editing import noise_to_start, repaint, strength_start_index
from difflab.diffusion.guidance import ClassifierFreeGuidance, Conditioned
from difflab.diffusion.samplers import DDIMSampler
from difflab.lightning.distributed import seed_this_rank
from difflab.lightning.optimization import optimizers_from_factories


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
        conditioner: Conditioner | None = None,  # class / text conditioning with condition dropout; None: none
        guidance_scale: float = 1.0,  # classifier-free guidance for previews (sample grids, generate's default)
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
        self.conditioner = conditioner if conditioner is not None else NoConditioning()
        self.guidance_scale = guidance_scale

    # ---- the diffusion space: pixels here, a first stage's latents in LatentDiffusionModule ----------

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the images the model generates and edits."""
        return self.image_shape

    def diffusion_input(self, batch: dict) -> Tensor:
        """The x0 that training diffuses: the batch's images."""
        return batch["image"]

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the diffusion space (editing starts from here)."""
        return images

    def decode(self, x: Tensor) -> Tensor:
        """The diffusion space -> images in [-1, 1]."""
        return x.clamp(-1, 1)

    def latent_mask(self, mask: Tensor) -> Tensor:
        """A pixel mask (B, 1, H, W) in the diffusion space's resolution."""
        return mask

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

    def on_fit_start(self) -> None:
        seed_this_rank(self.trainer)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        condition = self.conditioner.training_condition(batch)  # null with probability drop_prob
        out = self.loss(Conditioned(self.train_network, condition), self.diffusion_input(batch), self.schedule)
        self.log("train/loss", out.loss, prog_bar=True)
        if self._logging_step():
            self._log_loss_buckets(out)
        return out.loss

    def _logging_step(self) -> bool:
        """Whether the loggers write this step (every ``log_every_n_steps``): the per-bucket losses and the
        gradient norm are computed only then, as on other steps they would be computed and dropped."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _log_loss_buckets(self, out) -> None:
        bucket = (out.t * self.loss_buckets // self.schedule.num_timesteps).detach()
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
        return optimizers_from_factories(self.network.parameters(), self.optimizer_factory,
                                         self.lr_scheduler_factory)

    # ---- validation and sampling with the EMA weights --------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        # fixed t and noise per batch, so that the figure is comparable across validations
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        out = self.loss(Conditioned(self.ema, self.conditioner(batch)), self.diffusion_input(batch), self.schedule,
                        generator=generator)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return out.loss

    def guided(self, network: nn.Module, n: int, condition: Condition | None, guidance_scale: float | None = None,
               guidance_rescale: float = 0.0):
        """``model(x_t, t)`` for the samplers, for batches of n: ``network`` under ``condition`` with
        classifier-free guidance; ``condition=None`` samples unconditionally (the null condition, built once)."""
        null = self.conditioner.null(n, self.device)
        if not condition:
            return Conditioned(network, null)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return ClassifierFreeGuidance(network, condition, null, scale, guidance_rescale)

    def preview(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples for the sample-grid callback, under the conditioner's example conditions (one row per
        class for class-conditional models)."""
        return self.generate(n, generator=generator, condition=self.conditioner.examples(n, self.device))

    @torch.no_grad()
    def generate(self, n: int, *, sampler: Sampler | None = None, generator: torch.Generator | None = None,
                 progress: bool = False, use_ema: bool = True, condition: Condition | None = None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                 model_wrapper: Callable | None = None, noise: Tensor | None = None, init: Tensor | None = None,
                 strength: float = 1.0, mask: Tensor | None = None, resample: int = 1) -> Tensor:
        """n images (n, C, H, W) in [-1, 1] from the EMA weights with the configured (or given) sampler.

        ``condition``: from ``conditioner.from_request(labels=..., prompts=...)`` (n entries) or ``examples(n)``;
        None samples unconditionally. ``guidance_scale`` (default: the module's) and ``guidance_rescale``:
        classifier-free guidance (see ``difflab.diffusion.guidance``). ``model_wrapper``: applied to the
        ``model(x_t, t)`` the sampler calls, e.g. ``lambda m: ClassifierGuidance(m, classifier, labels, ...)``.
        ``noise``: the initial state (n, *image_shape) instead of a draw from ``generator`` (e.g. from ``invert``).

        Editing: ``init`` images (n or 1, C, H, W) in [-1, 1] with ``strength`` in [0, 1] is image-to-image
        (SDEdit, Meng et al. 2022): the input is noised to the grid step ``strength`` of the way up and denoised
        from there (0 returns ``decode(encode(init))``, 1 ignores the input: the same as no ``init``). With
        ``mask`` (n or 1, 1, H, W; 1 = regenerate) it is inpainting by RePaint (``resample`` repeats per step),
        and the result is ``init`` exactly outside the mask.
        """
        if condition and next(iter(condition.values())).shape[0] != n:
            raise ValueError(f"the condition is for {next(iter(condition.values())).shape[0]} samples, not {n}")
        sampler = sampler or self.sampler
        x_T = self._initial_noise(n, noise, generator)
        known = None
        if init is not None:
            init = init.to(self.device).expand(n, -1, -1, -1)
            known = self.encode(init)
            start = strength_start_index(sampler.num_steps, strength)
            if start == sampler.num_steps:  # strength 0: nothing to denoise
                return self._overlay(self.decode(known), init, mask)
            sampler = sampler.from_step(start)
            if start > 0:
                x_T = noise_to_start(sampler, known, x_T)
        elif mask is not None:
            raise ValueError("inpainting needs the image to inpaint: pass init= with mask=")
        with self._sampling_network(use_ema) as network:
            model = self.guided(network, n, condition, guidance_scale, guidance_rescale)
            if model_wrapper is not None:
                model = model_wrapper(model)
            prediction = self.loss.prediction
            if mask is not None:
                mask = mask.to(self.device).expand(n, -1, -1, -1)
                samples = repaint(sampler, model, x_T, known, self.latent_mask(mask), prediction,
                                  generator=generator, resample=resample, progress=progress)
            else:
                samples = sampler.sample(model, x_T, prediction_type=prediction, generator=generator,
                                         progress=progress)
        return self._overlay(self.decode(samples), init, mask)

    @torch.no_grad()
    def invert(self, images: Tensor, *, sampler: Sampler | None = None, condition: Condition | None = None,
               guidance_scale: float = 1.0, use_ema: bool = True, fixed_point_iterations: int = 1,
               progress: bool = False) -> Tensor:
        """DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F) of images (B, C, H, W) in
        [-1, 1] to the x_T that the same deterministic sampler maps back to them: ``generate(noise=x_T, ...)``
        with the same condition reconstructs the input, with another condition edits it. Guidance 1 (the
        default) inverts with the plain conditional model, which inverts faithfully; stronger guidance does not.
        """
        sampler = sampler or self.sampler
        if not isinstance(sampler, DDIMSampler) or sampler.eta != 0:
            raise ValueError(f"inversion runs the deterministic DDIM sampler backwards: use sampler=ddim with eta=0, "
                             f"not {sampler!r}{f' (eta={sampler.eta})' if isinstance(sampler, DDIMSampler) else ''}")
        x0 = self.encode(images.to(self.device))
        with self._sampling_network(use_ema) as network:
            model = self.guided(network, x0.shape[0], condition, guidance_scale)
            return sampler.invert(model, x0, self.loss.prediction, fixed_point_iterations=fixed_point_iterations,
                                  progress=progress)

    def _initial_noise(self, n: int, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if noise is not None:
            if tuple(noise.shape) != (n, *self.image_shape):
                raise ValueError(f"noise of shape {tuple(noise.shape)}, expected {(n, *self.image_shape)}")
            return noise.to(self.device)
        device = generator.device if generator is not None else self.device
        return torch.randn((n, *self.image_shape), generator=generator, device=device).to(self.device)

    @staticmethod
    def _overlay(images: Tensor, init: Tensor | None, mask: Tensor | None) -> Tensor:
        """Inpainting's final paste: the input's pixels outside the mask (exact in pixel space for latent models,
        whose decoder only approximates them)."""
        if mask is None:
            return images
        mask = mask.to(images)
        return mask * images + (1 - mask) * init.to(images)

    @contextmanager
    def _sampling_network(self, use_ema: bool):
        """The EMA (or raw) network in eval mode for the duration, restored afterwards."""
        network = self.ema if use_ema else self.network
        was_training = network.training
        network.eval()
        try:
            yield network
        finally:
            network.train(was_training)

    # ---- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["difflab_config"] = self.run_config

