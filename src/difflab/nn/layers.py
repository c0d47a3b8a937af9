"""Small building blocks shared by the networks."""

from __future__ import annotations

import math

from torch import nn


def group_norm(channels: int, groups: int = 32, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels`` (skip concats give 48, 96...)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, affine=affine)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that its residual branch starts as the identity (ADM, LDM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
