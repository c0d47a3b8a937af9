"""The LightningModule that trains the first stage of latent diffusion: a KL autoencoder, optionally with a
patch discriminator (Rombach et al. 2022, Appendix G; LDM's ``LPIPSWithDiscriminator`` without LPIPS, whose
weights are a download)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from difflab.errors import UsageError
from difflab.lightning.base import DifflabModule
from difflab.nn.autoencoder import Autoencoder

RECONSTRUCTION_LOSSES = ("l1", "l2")


class AutoencoderModule(DifflabModule):
    """Trains ``autoencoder`` on loss = rec + kl_weight * KL [+ lambda * disc_weight * L_G after ``disc_start``].

    As in LDM, the reconstruction and KL terms are summed over each image's elements and averaged over the
    batch (so ``kl_weight=1e-6`` means what it means there), the adversarial term uses the hinge loss and
    its weight lambda = |grad rec| / |grad L_G| at the decoder's last layer. The generator and discriminator
    losses are summed into one objective whose two parts reach disjoint parameters (the discriminator is
    frozen while it scores the generator, reconstructions are detached for its own loss), so one optimizer
    step updates both and ``trainer.global_step`` counts batches.

    The latent scale factor that the diffusion stage multiplies latents by, 1 / std of the posterior samples
    over the training data, is kept as the buffer ``latent_scale`` (saved in every checkpoint): a running
    estimate over the last ``latent_scale_window`` training images, updated from the latents each training
    step computes anyway.
    """

    def __init__(
        self,
        autoencoder: Autoencoder,
        optimizer: Callable[..., torch.optim.Optimizer],  # partial: optimizer(params)
        lr_scheduler: Callable[..., Any] | None = None,  # partial, stepped per step
        kl_weight: float = 1e-6,  # LDM's KL-f4/f8 value: a near-deterministic, lightly regularised latent
        reconstruction: str = "l1",  # l1 | l2
        discriminator: nn.Module | None = None,  # e.g. difflab.nn.PatchDiscriminator; None: no adversarial loss
        disc_start: int = 5000,  # optimizer steps before the adversarial loss is switched on
        disc_weight: float = 0.5,
        latent_scale_window: int = 2048,  # images in the running estimate of the latents' std
        run_config: dict | None = None,  # the composed run config, stored in checkpoints
    ):
        super().__init__(optimizer, lr_scheduler, run_config)
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise UsageError(f"unknown reconstruction loss {reconstruction!r}; "
                             f"valid: {', '.join(RECONSTRUCTION_LOSSES)}")
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.kl_weight = kl_weight
        self.reconstruction = reconstruction
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.latent_scale_window = latent_scale_window
        self.register_buffer("latent_scale", torch.ones((), dtype=torch.float64))
        # exponentially forgetting (count, sum, sum of squares) of the latents' elements
        self.register_buffer("latent_moments", torch.zeros(3, dtype=torch.float64))
        self._preview_batch: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction through the posterior mean."""
        return self.autoencoder(x, sample_posterior=False)[0]

    # ---- losses ---------------------------------------------------------------------------------

    def reconstruction_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Summed over each image's elements, averaged over the batch."""
        error = (x - x_hat).abs() if self.reconstruction == "l1" else (x - x_hat).square()
        return error.flatten(1).sum(1).mean()

    def adversarial_weight(self, rec_loss: Tensor, g_loss: Tensor) -> Tensor:
        """LDM's lambda = |grad_w rec| / (|grad_w L_G| + 1e-4), w the decoder's last layer, clamped to
        [0, 1e4] and detached."""
        last = self.autoencoder.decoder.last_layer
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["image"]
        if self._preview_batch is None:  # until a validation batch replaces it
            self._preview_batch = x.detach()
        posterior = self.autoencoder.encode(x)
        z = posterior.sample()
        x_hat = self.autoencoder.decode(z)
        rec_loss = self.reconstruction_loss(x, x_hat)
        kl = posterior.kl().mean()
        loss = rec_loss + self.kl_weight * kl
        self.log("train/rec_loss", rec_loss, prog_bar=True)
        self.log("train/kl", kl)
        if self.discriminator is not None and self.global_step >= self.disc_start:
            self.discriminator.requires_grad_(False)  # L_G trains the autoencoder only
            g_loss = -self.discriminator(x_hat).mean()
            self.discriminator.requires_grad_(True)
            weight = self.adversarial_weight(rec_loss, g_loss) * self.disc_weight
            logits_real, logits_fake = self.discriminator(x), self.discriminator(x_hat.detach())
            d_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())  # hinge
            loss = loss + weight * g_loss + d_loss
            self.log_dict({"train/g_loss": g_loss, "train/d_loss": d_loss, "train/d_weight": weight})
        self.update_latent_scale(z.detach())
        self.log("train/latent_scale", self.latent_scale.float())
        return loss

    @torch.no_grad()
    def update_latent_scale(self, z: Tensor) -> None:
        z = z.double()
        decay = max(0.0, 1.0 - z.shape[0] / self.latent_scale_window)
        self.latent_moments.mul_(decay).add_(torch.stack([torch.tensor(z.numel(), dtype=z.dtype, device=z.device),
                                                          z.sum(), z.square().sum()]))
        count, total, squares = self.latent_moments.unbind()
        variance = squares / count - (total / count) ** 2
        self.latent_scale.copy_(variance.clamp_min(1e-12).rsqrt())

    # ---- validation -------------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        posterior = self.autoencoder.encode(x)
        x_hat = self.autoencoder.decode(posterior.mode())
        if batch_idx == 0:
            self._preview_batch = x.detach()
        # PSNR of each image in [0, 1], averaged over images
        psnr = peak_signal_noise_ratio((x_hat.clamp(-1, 1) + 1) / 2, (x + 1) / 2, data_range=1.0, dim=(1, 2, 3))
        size = x.shape[0]
        self.log("val/psnr", psnr, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/rec_loss", self.reconstruction_loss(x, x_hat), sync_dist=True, batch_size=size)
        self.log("val/kl", posterior.kl().mean(), sync_dist=True, batch_size=size)

    @torch.no_grad()
    def preview(self, n: int, seed: int = 0) -> Tensor | None:
        """For the sample-grid callback: rows of validation images (training images before the first
        validation), each followed by its reconstruction, in [0, 1]."""
        if self._preview_batch is None:
            return None
        x = self._preview_batch[: max(n // 2, 1)]
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        x_hat = self.forward(x).clamp(-1, 1)
        self.autoencoder.train(was_training)
        row = max(int(n**0.5), 1)
        pairs = [t for k in range(0, x.shape[0], row) for t in (x[k:k + row], x_hat[k:k + row])]
        return (torch.cat(pairs) + 1) / 2

