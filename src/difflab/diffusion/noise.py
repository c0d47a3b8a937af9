"""Gaussian noise drawn reproducibly: from one generator, or one generator per sample (row)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape``, drawn in float32 on the generator's device and then moved, so the values
    depend on the seed alone (not on the target device or dtype). A list of generators draws row k of the batch
    (dimension 0) from generator k: a sample's noise is then the same whatever batch it is drawn in."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per sample")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device).to(device) for g in generator]
        return torch.stack(rows).to(dtype)
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source).to(device=device, dtype=dtype)


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """``randn(x.shape, ...)`` on x's device in x's dtype."""
    return randn(x.shape, generator, x.device, x.dtype)
