"""Guidance: classifier-free guidance wraps the network into a ``model(x_t, t)``; classifier guidance a ``Denoiser``.

Classifier-free guidance (Ho & Salimans 2022, eq. 6): f = f_u + w (f_c - f_u), with f_c, f_u the network's
conditional and unconditional (null-condition) outputs. Applied to the raw output of any prediction type:
epsilon, x0 and v are each affine in the network output with coefficients that depend only on (x_t, t), and
the weights (1 - w) and w sum to one, so guiding the output equals guiding epsilon (or the score).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difflab.conditioning.base import Condition, concat_conditions
from difflab.diffusion.denoiser import Denoiser
from difflab.errors import UsageError


class ClassifierFreeGuidance:
    """``model(x_t, t)`` = guided output of ``network(x_t, t, **condition)``.

    ``scale`` w: 1 gives the conditional output (one forward), 0 the unconditional one (one forward); other
    values batch the conditional and unconditional passes into one forward of twice the batch.
    ``rescale`` phi (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16):
    the guided output's per-sample standard deviation is matched to the conditional output's, then blended
    with the unrescaled one: phi * f * std(f_c) / std(f) + (1 - phi) * f (as diffusers' ``rescale_noise_cfg``).
    """

    def __init__(self, network: Callable[..., Tensor], condition: Condition, null_condition: Condition,
                 scale: float, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise UsageError(f"guidance_rescale must lie in [0, 1], got {rescale}")
        self.network, self.condition, self.null_condition = network, condition, null_condition
        self.scale, self.rescale = float(scale), float(rescale)
        self._both = concat_conditions(null_condition, condition) if scale not in (0.0, 1.0) else None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.network(x, t, **self.condition)
        if self.scale == 0.0:
            return self.network(x, t, **self.null_condition)
        both = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in self._both.items()}
        uncond, cond = self.network(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            dims = tuple(range(1, guided.ndim))
            ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        return guided


class Conditioned:
    """``model(x_t, t)`` = ``network(x_t, t, **condition)``: a fixed condition, no guidance."""

    def __init__(self, network: Callable[..., Tensor], condition: Condition):
        self.network, self.condition = network, condition

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.network(x, t, **self.condition)


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2): the noise estimate is shifted along the
    gradient of a noisy classifier's log-probability of the wanted classes,

        eps' = eps - s * sigma_t * grad_{x_t} log p_phi(y | x_t, t),

    i.e. the score gains s * grad log p(y | x_t); x0 follows from eps'. It wraps a ``Denoiser`` (unconditional, or
    classifier-free guided) and is one itself, so every sampler takes it. ``classifier(x_t, t) -> logits (B, K)``.
    """

    def __init__(self, denoiser: Denoiser, classifier: Callable[[Tensor, Tensor], Tensor], labels: Tensor,
                 scale: float):
        self.denoiser, self.classifier, self.labels, self.scale = denoiser, classifier, labels, float(scale)
        self.schedule, self.prediction = denoiser.schedule, denoiser.prediction

    def grad_log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(self.classifier(x_in, t).double(), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), self.labels.to(x.device)]
            return torch.autograd.grad(selected.sum(), x_in)[0]

    def __call__(self, x: Tensor, t: Tensor, abar: float | None = None, *,
                 model_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        x0, eps = self.denoiser(x, t, abar, model_dtype=model_dtype)
        if self.scale == 0:
            return x0, eps
        if abar is None:
            alpha, sigma = (c.to(x.dtype) for c in self.schedule.alpha_sigma(t, x))
        else:
            alpha, sigma = abar**0.5, (1 - abar) ** 0.5
        eps = eps - self.scale * sigma * self.grad_log_prob(x.to(model_dtype or x.dtype), t).to(x.dtype)
        return (x - sigma * eps) / alpha, eps
