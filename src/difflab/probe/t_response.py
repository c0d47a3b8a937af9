"""How much each ResBlock's (a DiT's: each block's) activations change when only the timestep given changes.

The input is held fixed (real images noised to ``reference_t``, one draw of noise) and the network is told other
timesteps: whatever changes in a block's output then came in through the time embedding and its injection. A block
whose activations do not move with t is blind to the noise level (as ``add`` behind a one-channel-per-group norm
was); comparing injections (add, concat, FiLM, AdaGN) on trained networks shows where in the UNet each lets t act.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.conditioning.base import Condition
from difflab.errors import UsageError
from difflab.nn.dit import DiTBlock
from difflab.nn.embeddings import TIME_EMBEDDINGS
from difflab.nn.unet import ResBlock
from difflab.pipeline import Pipeline
from difflab.probe.common import diffusion_space, fixed_noise, network_input, noised, timestep_grid

OUTPUT = "output"  # the network's output, probed beside its blocks


@dataclass
class TResponse:
    """``change[b, j]``: mean over images of ||h_b(t_j) - h_b(t_ref)|| / ||h_b(t_ref)|| for block b;
    ``spread[b]``: the root-mean-square deviation of h_b over the timesteps from its mean over them, relative to
    h_b's root-mean-square (0: blind to t; scale-free, so blocks and networks compare)."""

    blocks: list[str]
    timesteps: list[int]
    reference_t: int
    change: Tensor
    spread: Tensor
    time_embedding: str | None = None
    time_injection: str | None = None

    def scalars(self) -> dict[str, float]:
        """Summary numbers for dashboards: the mean and smallest spread over the blocks (the output excluded)."""
        blocks = self.spread[:-1] if self.blocks[-1] == OUTPUT else self.spread
        return {"t_spread_mean": float(blocks.mean()), "t_spread_min": float(blocks.min()),
                "t_spread_output": float(self.spread[-1])}

    def to_dict(self) -> dict:
        return {"probe": "t_response", "blocks": self.blocks, "timesteps": self.timesteps,
                "reference_t": self.reference_t, "change": self.change.tolist(), "spread": self.spread.tolist(),
                "time_embedding": self.time_embedding, "time_injection": self.time_injection, **self.scalars()}

    def table(self) -> str:
        lines = ["| block | spread over t |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in zip(self.blocks, self.spread.tolist(), strict=True)]
        return "\n".join(lines) + "\n"

    def figure(self, title: str = ""):
        from difflab.plots import t_response_figure

        return t_response_figure(self, title=title)


@torch.no_grad()
def t_response(pipe: Pipeline, batch: dict, timesteps: Sequence[int] | None = None, reference_t: int | None = None,
               condition: Condition | None = None, seed: int = 0) -> TResponse:
    """Probe ``pipe.network`` on ``batch`` (its ``image`` in [-1, 1]) noised to ``reference_t`` (default the middle
    timestep), told each of ``timesteps`` (default 10 spread over the schedule) under ``condition`` (default the
    null one)."""
    network, device = pipe.network, pipe.device
    blocks = [(name, module) for name, module in network.named_modules() if isinstance(module, ResBlock | DiTBlock)]
    if not blocks:
        raise UsageError(f"probe=t_response needs a network with difflab's ResBlocks or DiT blocks (a UNet or a "
                         f"DiT); {type(network).__name__} has none")
    num_timesteps = pipe.schedule.num_timesteps
    timesteps = list(timesteps) if timesteps is not None else timestep_grid(num_timesteps)
    reference_t = num_timesteps // 2 if reference_t is None else int(reference_t)
    x0 = diffusion_space(pipe, batch)
    x = network_input(pipe, noised(pipe, x0, reference_t, fixed_noise(x0.shape, seed, device)), reference_t)
    condition = pipe.conditioner.null(len(x), device) if condition is None else condition
    captured: dict[str, Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out.float()))
             for name, module in blocks]
    was_training = network.training
    network.eval()
    try:
        def run(t: int) -> dict[str, Tensor]:
            output = network(x, torch.full((len(x),), t, device=device), **condition).float()
            return {**{name: captured[name] for name, _ in blocks}, OUTPUT: output}

        reference = run(reference_t)
        outputs = [run(t) for t in timesteps]
    finally:
        for hook in hooks:
            hook.remove()
        network.train(was_training)
    names = [name for name, _ in blocks] + [OUTPUT]
    change = torch.zeros(len(names), len(timesteps), dtype=torch.float64)
    spread = torch.zeros(len(names), dtype=torch.float64)
    for b, name in enumerate(names):
        ref = reference[name].flatten(1).double()
        stack = torch.stack([out[name].flatten(1).double() for out in outputs])  # (T, B, D)
        change[b] = ((stack - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean(dim=-1)
        deviation = (stack - stack.mean(0)).pow(2).mean()
        spread[b] = (deviation / stack.pow(2).mean().clamp_min(1e-24)).sqrt()
    return TResponse(names, timesteps, reference_t, change, spread, _embedding(network),
                     _injection(blocks))


def _embedding(network) -> str | None:
    """The network's ``time_embedding`` option (sinusoidal, learned, sinusoidal_mlp)."""
    kind = type(getattr(network, "time_embed", getattr(network, "t_embedder", None)))
    return next((name for name, cls in TIME_EMBEDDINGS.items() if cls is kind), None)


def _injection(blocks) -> str | None:
    kinds = {getattr(module, "time_injection", "adaln_zero") for _, module in blocks}  # a DiT's blocks: adaLN-Zero
    return kinds.pop() if len(kinds) == 1 else None
