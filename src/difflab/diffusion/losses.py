"""The loss group: how training's noise is drawn (offset noise, input perturbation) and how the network's output is
compared with its target (L2, L1, Huber, pseudo-Huber), per sample. ``DiffusionLoss`` weights and averages it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.errors import UsageError


class Loss:
    """L2 on the prediction target, with two options on the noise every distance shares.

    ``offset_noise`` (Guttenberg 2023, "Diffusion with offset noise"): eps + offset * xi, xi ~ N(0, 1) per sample
    and channel (constant over pixels), so the model learns to change an image's mean brightness; the target uses
    this noise. ``input_perturbation`` (Ning et al. 2023, Eq. 9): x_t is built from eps + gamma * xi while the
    target keeps eps, which trains the network on inputs like its own imperfect samples (exposure bias). Both as in
    diffusers' text-to-image example (offset first, the perturbation on top); validation uses plain noise.
    """

    name = "l2"

    def __init__(self, offset_noise: float = 0.0, input_perturbation: float = 0.0):
        for key, value in (("offset_noise", offset_noise), ("input_perturbation", input_perturbation)):
            if value < 0:
                raise UsageError(f"loss.{key} must be >= 0 (0: off; 0.1 is usual), got {value}")
        self.offset_noise, self.input_perturbation = float(offset_noise), float(input_perturbation)

    def noise(self, noise: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """From a standard normal draw: (the noise of the target, the noise that builds x_t)."""
        if self.offset_noise:
            offset_shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
            noise = noise + self.offset_noise * _randn(offset_shape, noise, generator)
        if not self.input_perturbation:
            return noise, noise
        return noise, noise + self.input_perturbation * _randn(noise.shape, noise, generator)

    def elementwise(self, error: Tensor) -> Tensor:
        return error.square()

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        """(B,) distance of each sample: the mean of ``elementwise(output - target)`` over its elements, in float32."""
        return self.elementwise(output.float() - target.float()).flatten(1).mean(dim=1)

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({keys})"


class L2Loss(Loss):
    """The squared error (DDPM's simple loss; what the loss weightings are derived for)."""


class L1Loss(Loss):
    """The absolute error (used by Saharia et al. 2022's Palette); the loss weightings apply unchanged."""

    name = "l1"

    def elementwise(self, error: Tensor) -> Tensor:
        return error.abs()


class HuberLoss(Loss):
    """Huber's loss per element, torch's ``huber_loss``: e^2 / 2 below ``delta``, delta (|e| - delta / 2) above.
    delta defaults to 0.1 since errors in eps / v space are of order 0.1 - 1: delta = 1 would be L2 nearly
    everywhere."""

    name = "huber"

    def __init__(self, delta: float = 0.1, offset_noise: float = 0.0, input_perturbation: float = 0.0):
        super().__init__(offset_noise, input_perturbation)
        if delta <= 0:
            raise UsageError(f"loss.delta must be > 0, got {delta}")
        self.delta = float(delta)

    def elementwise(self, error: Tensor) -> Tensor:
        return F.huber_loss(error, torch.zeros_like(error), reduction="none", delta=self.delta)


class PseudoHuberLoss(Loss):
    """The pseudo-Huber metric of Song & Dhariwal 2023 (Sec. 3.3) over each sample:
    d = sqrt(||e||^2 / D + c^2) - c for D elements.

    The paper's sqrt(||e||^2 + c_p^2) - c_p with c_p = 0.00054 sqrt(D), divided by sqrt(D): c = 0.00054 is then
    the same at every resolution and the gradient has L2's scale per element, which the default gradient
    clipping (1.0) assumes. It is L2-like for errors below c and L1-like (in the norm) above.
    """

    name = "pseudo_huber"

    def __init__(self, c: float = 0.00054, offset_noise: float = 0.0, input_perturbation: float = 0.0):
        super().__init__(offset_noise, input_perturbation)
        if c <= 0:
            raise UsageError(f"loss.c must be > 0, got {c}")
        self.c = float(c)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        mean_square = super().__call__(output, target)  # the base's elementwise is the squared error
        return (mean_square + self.c**2).sqrt() - self.c


def _randn(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)
