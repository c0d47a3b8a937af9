"""The guidance gap: how far the conditional prediction lies from the unconditional one, against t.

Classifier-free guidance moves the prediction by w (f(x_t, c) - f(x_t, null)) (Ho & Salimans 2022, eq. 6); this
probe measures that difference on real images noised to each t, in epsilon units whatever the network predicts,
so models and prediction types compare. Where it is near zero the condition does nothing and guidance cannot help.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.conditioning.base import NoConditioning
from difflab.errors import UsageError
from difflab.pipeline import Pipeline
from difflab.probe.common import diffusion_space, fixed_noise, noised, timestep_grid


@dataclass
class GuidanceGap:
    """``gap[j]``: mean over images of the root-mean-square of eps(x_t, c) - eps(x_t, null) at ``timesteps[j]``;
    ``relative[j]``: the same over the root-mean-square of eps(x_t, null)."""

    timesteps: list[int]
    gap: Tensor
    relative: Tensor

    def scalars(self) -> dict[str, float]:
        return {"cfg_gap_mean": float(self.gap.mean()), "cfg_gap_max": float(self.gap.max())}

    def to_dict(self) -> dict:
        return {"probe": "cfg_gap", "timesteps": self.timesteps, "gap": self.gap.tolist(),
                "relative": self.relative.tolist(), **self.scalars()}

    def table(self) -> str:
        lines = ["| t | gap (eps rms) | relative |", "|---|---|---|"]
        lines += [f"| {t} | {g:.4f} | {r:.4f} |"
                  for t, g, r in zip(self.timesteps, self.gap.tolist(), self.relative.tolist(), strict=True)]
        return "\n".join(lines) + "\n"

    def figure(self, title: str = ""):
        from difflab.plots import guidance_gap_figure

        return guidance_gap_figure(self, title=title)


@torch.no_grad()
def guidance_gap(pipe: Pipeline, batch: dict, timesteps: Sequence[int] | None = None, seed: int = 0) -> GuidanceGap:
    """The gap on ``batch`` (``image`` in [-1, 1] with its ``label`` / ``caption``: each image under its own
    condition) at ``timesteps`` (default 10 spread over the schedule), one draw of noise shared by all t."""
    if isinstance(pipe.conditioner, NoConditioning):
        raise UsageError("probe=cfg_gap needs a conditional model (conditioning=class, text or class_text); "
                         "this one is unconditional")
    device = pipe.device
    x0 = diffusion_space(pipe, batch)
    eps = fixed_noise(x0.shape, seed, device)
    condition = {k: v.to(device) for k, v in pipe.conditioner(batch).items()}
    conditional, unconditional = (pipe.denoiser(c, len(x0), guidance_scale=1.0) for c in (condition, None))
    timesteps = list(timesteps) if timesteps is not None else timestep_grid(pipe.schedule.num_timesteps)
    gaps, relative = [], []
    was_training = pipe.network.training
    pipe.network.eval()
    try:
        for t in timesteps:
            x_t = noised(pipe, x0, t, eps)
            steps = torch.full((len(x0),), t, device=device)
            eps_c, eps_u = (denoiser(x_t, steps)[1].double().flatten(1) for denoiser in (conditional, unconditional))
            rms = (eps_c - eps_u).pow(2).mean(-1).sqrt()
            gaps.append(rms.mean())
            relative.append((rms / eps_u.pow(2).mean(-1).sqrt().clamp_min(1e-12)).mean())
    finally:
        pipe.network.train(was_training)
    return GuidanceGap(timesteps, torch.stack(gaps), torch.stack(relative))
