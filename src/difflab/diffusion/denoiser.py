"""The one interface samplers and guidance see: a noisy x_t at a noise level -> (x0_hat, eps_hat).

It wraps a network's raw output once (after EDM's preconditioner and sgm's ``Denoiser``), so the samplers never
know whether the network predicts eps, x0 or v: a new parameterisation is a new ``Prediction``, not an argument
threaded through every solver.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difflab.diffusion.parameterization import EpsilonPrediction, Prediction, get_prediction
from difflab.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]


class Denoiser:
    """``denoiser(x_t, t, abar)`` -> (x0_hat, eps_hat) for a ``model(x_t, t)`` (the network, or a classifier-free
    guidance wrapper around it) that outputs ``prediction`` under ``schedule``.

    x_t: (B, ...) in the variance-preserving space, in any dtype (the conversion runs in x_t's; samplers keep
    float64 state); t: (B,) training timesteps; ``abar``: the noise level of x_t (a grid's, which may be floored);
    default the schedule's at t. The model sees ``model_dtype`` (default x_t's).
    """

    def __init__(self, model: ModelFn, schedule: NoiseSchedule, prediction: str | Prediction = "epsilon"):
        self.model, self.schedule, self.prediction = model, schedule, get_prediction(prediction)

    def __call__(self, x: Tensor, t: Tensor, abar: float | None = None, *,
                 model_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        if abar is None:
            alpha, sigma = (c.to(x.dtype) for c in self.schedule.alpha_sigma(t, x))
        else:
            if abar == 0 and isinstance(self.prediction, EpsilonPrediction):
                raise ValueError("the grid starts at zero SNR (alpha_bar = 0), where an epsilon-prediction model "
                                 "cannot estimate x0; train with prediction=v_prediction (Lin et al. 2023) or use "
                                 "timestep_spacing=leading")
            alpha, sigma = abar**0.5, (1 - abar) ** 0.5
        output = self.model(self.prediction.scale_input(x, alpha, sigma).to(model_dtype or x.dtype), t).to(x.dtype)
        return self.prediction.to_x0_eps(output, x, alpha, sigma)
