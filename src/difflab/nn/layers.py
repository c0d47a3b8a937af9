"""Small building blocks shared by the networks."""

from __future__ import annotations

import math

from torch import nn


def group_norm(channels: int, groups: int = 32, affine: bool = True, min_group_size: int = 1) -> nn.GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups (skip concats give 48, 96...), fewer if that would put fewer
    than ``min_group_size`` channels in a group: a norm with one channel per group removes any per-channel constant
    added before it."""
    count = math.gcd(groups, channels)
    while count > 1 and channels // count < min_group_size:
        count = max(d for d in range(1, count) if channels % d == 0)
    return nn.GroupNorm(count, channels, affine=affine)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that its residual branch starts as the identity (ADM, LDM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
