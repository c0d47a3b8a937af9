"""Randomness under data parallelism."""

from __future__ import annotations

import os

import lightning as L
import torch


def seed_this_rank(trainer: L.Trainer) -> None:
    """Give every rank its own stream of training randomness (timesteps, noise, condition dropout, augmentation in
    the main process). ``seed_everything`` seeds every rank alike, so without this all ranks draw the same t and
    noise at each step and a global batch of R x B images holds only B distinct (t, noise) pairs. Model weights
    stay identical across ranks regardless: DDP broadcasts rank 0's at wrap. One process: unchanged."""
    if trainer.world_size <= 1:
        return
    base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
    torch.manual_seed((base + 1_000_003 * trainer.global_rank) % 2**63)
