"""Training objective: which timesteps are drawn, how the loss is weighted over noise levels, the loss.

The three concerns are separate small classes, each a Hydra node, combined by ``DiffusionLoss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.diffusion.losses import L2Loss, Loss
from difflab.diffusion.parameterization import (
    EDMPrediction,
    EpsilonPrediction,
    FlowPrediction,
    Prediction,
    SamplePrediction,
    VPrediction,
    get_prediction,
)
from difflab.diffusion.schedules import NoiseSchedule


class UniformTimesteps:
    """t ~ Uniform{0, ..., T-1}, as in DDPM's Algorithm 1 (Ho et al. 2020)."""

    def __call__(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        num_timesteps = schedule if isinstance(schedule, int) else schedule.num_timesteps
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)


class LogitNormalTimesteps:
    """Stable Diffusion 3's training levels (Esser et al. 2024, Eq. 19 and 23): the flow time s = sigmoid(z),
    z ~ N(mean, std^2), shifted to shift s / (1 + (shift - 1) s), returned as the schedule's fractional timesteps
    (the level of x_s = (1 - s) x0 + s eps on any schedule; float64)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
        self.mean, self.std, self.shift = mean, std, shift

    def __call__(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        z = torch.randn(batch_size, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        s = torch.sigmoid(z * self.std + self.mean)
        s = self.shift * s / (1 + (self.shift - 1) * s)
        return schedule.sigma_to_t(s / (1 - s)).to(device)  # sigma of x_s / (1 - s) = x0 + s / (1 - s) eps


class LogNormalTimesteps:
    """EDM's training noise levels (Karras et al. 2022, Table 1): log sigma ~ N(p_mean, p_std^2), returned as the
    schedule's fractional timesteps (float64; sigmas beyond the schedule's ends are clamped to them)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, batch_size: int, schedule: NoiseSchedule, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        log_sigma = torch.randn(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
        sigma = (log_sigma * self.p_std + self.p_mean).exp().cpu()
        return schedule.sigma_to_t(sigma).to(device)


class LossWeighting:
    """Per-sample weight of the squared error in the network's own output space, from SNR(t)."""

    def __call__(self, snr: Tensor, prediction: Prediction) -> Tensor:
        raise NotImplementedError


class UniformWeighting(LossWeighting):
    """Weight 1: the plain MSE on the prediction target (DDPM's 'simple' loss for eps)."""

    def __call__(self, snr: Tensor, prediction: Prediction) -> Tensor:
        return torch.ones_like(snr)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma weighting (Hang et al. 2023, Eq. 8-9).

    The paper weights the x0-space error by min(SNR, gamma). Since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
    and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, the same weight in each output space is
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v; for EDM's F,
    ||F - F_hat||^2 = ||x0 - x0_hat||^2 / c_out^2 with c_out^2 = s_d^2 / (1 + s_d^2 SNR), so
    min(SNR, gamma) s_d^2 / (1 + s_d^2 SNR).
    """

    def __init__(self, gamma: float = 5.0):  # gamma: clamp on SNR; the paper's default is 5
        self.gamma = gamma

    def __call__(self, snr: Tensor, prediction: Prediction) -> Tensor:
        clamped = snr.clamp(max=self.gamma)
        if isinstance(prediction, EpsilonPrediction):
            # min(SNR, gamma)/SNR written as min(1, gamma/SNR) so that SNR = 0 gives 1, not 0/0
            return (self.gamma / snr).clamp(max=1.0)
        if isinstance(prediction, SamplePrediction):
            return clamped
        if isinstance(prediction, VPrediction):
            return clamped / (snr + 1)
        if isinstance(prediction, FlowPrediction):  # x0 = x_s - s u: ||u - u_hat||^2 = ||x0 - x0_hat||^2 / s^2
            return clamped / (1 + snr.sqrt()) ** 2
        if isinstance(prediction, EDMPrediction):
            return clamped * prediction.sigma_data**2 / (1 + prediction.sigma_data**2 * snr)
        raise TypeError(f"MinSNRWeighting has no form for {prediction!r}")


@dataclass
class LossOutput:
    loss: Tensor  # scalar: mean of per_sample
    per_sample: Tensor  # (B,) weighted loss of each sample, for per-timestep logging
    t: Tensor  # (B,) the timesteps drawn (long; float64 where a sampler draws between them)


class DiffusionLoss:
    """Denoising loss E_{t, eps} w(t) d(f(x_t, t), target) (Ho et al. 2020, Algorithm 1, generalised): d and the
    noise options from ``loss`` (default the squared error, DDPM's)."""

    def __init__(
        self,
        prediction: str | Prediction = "epsilon",  # what the network outputs: epsilon | sample | v_prediction
        weighting: LossWeighting | None = None,  # loss weight over noise levels; default uniform
        timestep_sampler: Callable[..., Tensor] | None = None,  # (batch_size, schedule, device, generator) -> t
        loss: Loss | None = None,  # the distance and the noise options; default L2, plain noise
    ):
        self.prediction = get_prediction(prediction)
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.timestep_sampler = timestep_sampler if timestep_sampler is not None else UniformTimesteps()
        self.loss_fn = loss if loss is not None else L2Loss()

    def __call__(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        schedule: NoiseSchedule,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        train: bool = True,
        sample_weight: Tensor | None = None,
    ) -> LossOutput:
        """x0: (B, ...) clean data. Draws t and eps unless given; returns the weighted loss. ``train=False``
        (validation) leaves out the loss's offset noise and input perturbation: the plain forward process.
        ``sample_weight`` (B,): the loss is the mean of the per-sample losses times it (DreamBooth's prior term)."""
        if t is None:
            t = self.timestep_sampler(x0.shape[0], schedule, x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                                device=generator.device if generator is not None else x0.device).to(x0.device)
        noise, input_noise = self.loss_fn.noise(noise, generator) if train else (noise, noise)
        x_t = schedule.add_noise(x0, input_noise, t)
        alpha, sigma = (c.to(x0.dtype) for c in schedule.alpha_sigma(t, x0))
        target = self.prediction.target(x0, noise, alpha, sigma)
        output = model_fn(self.prediction.scale_input(x_t, alpha, sigma), t)
        weight = self.weighting(schedule.snr_at(t), self.prediction).float()
        per_sample = weight * self.loss_fn(output, target)
        loss = per_sample.mean() if sample_weight is None else (per_sample * sample_weight.to(per_sample)).mean()
        return LossOutput(loss=loss, per_sample=per_sample, t=t)
