"""A learning-rate schedule over the run's budget, in steps or in wall-clock time (``lr_scheduler=budget``).

``python train.py`` stops on ``trainer.max_time``, so the number of steps is not known in advance and a step-based
decay (``CosineAnnealingLR(T_max=max_steps)``) never gets far; measuring progress by the clock lets the learning
rate reach its floor when the trainer stops, whatever the machine's speed. Decaying to zero over the budget is what
Li et al. 2020 ("Budgeted Training: Rethinking Deep Neural Network Training Under Resource Constraints") found best
for a fixed budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from difflab.errors import UsageError

SHAPES = ("linear", "cosine")


def duration_seconds(value: str | Mapping | timedelta | float | None) -> float | None:
    """Seconds of a duration in Lightning's ``max_time`` forms: "DD:HH:MM:SS", a dict of ``timedelta`` arguments, a
    ``timedelta`` or a number of seconds; None stays None (no time budget)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return timedelta(**value).total_seconds()
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"max_time {value!r} is not DD:HH:MM:SS; write e.g. max_time=00:00:12:00")
        days, hours, minutes, seconds = (int(p) for p in parts)
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    return float(value)


class BudgetLR(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then a decay to ``final_factor`` times the base rate over the last
    ``decay_fraction`` of the budget (1: the whole run; 0.2: constant, then the last fifth, "warmup-stable-decay").

    Progress is the larger of ``step / max_steps`` and ``elapsed / max_time`` (whichever budget runs out first);
    elapsed is the time between this scheduler's steps, so validation and sample grids count as they do for
    Lightning's ``max_time``, and a resumed run continues from its saved elapsed time (the pause is not counted).
    Stepped once per optimizer step.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 200, max_steps: int | None = None,
                 max_time: str | Mapping | timedelta | float | None = None, decay_fraction: float = 1.0,
                 final_factor: float = 0.0, shape: str = "linear", start_factor: float = 0.01,
                 clock: Callable[[], float] = time.monotonic, last_epoch: int = -1):
        if shape not in SHAPES:
            raise UsageError(f"unknown lr_scheduler.shape {shape!r}; valid: {', '.join(SHAPES)}")
        if not 0.0 < decay_fraction <= 1.0:
            raise UsageError(f"lr_scheduler.decay_fraction must lie in (0, 1], got {decay_fraction}")
        self.max_steps = max_steps if max_steps is not None and max_steps > 0 else None
        self.max_seconds = duration_seconds(max_time)
        if self.max_steps is None and not self.max_seconds:
            raise UsageError("lr_scheduler=budget decays over the run's budget, but it has none: set trainer.max_steps "
                             "or trainer.max_time (or use lr_scheduler=warmup)")
        self.warmup_steps, self.start_factor = warmup_steps, start_factor
        self.decay_fraction, self.final_factor, self.shape = decay_fraction, final_factor, shape
        self.clock = clock
        self.elapsed = 0.0  # seconds of training so far (saved with the state)
        self._last_tick: float | None = None  # not saved: the time between a save and a resume is no training
        super().__init__(optimizer, last_epoch)

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in ("clock", "_last_tick")}

    def step(self, epoch: int | None = None) -> None:
        now = self.clock()
        if self._last_tick is not None:
            self.elapsed += now - self._last_tick
        self._last_tick = now
        super().step(epoch)

    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]."""
        fractions = [self.last_epoch / self.max_steps] if self.max_steps else []
        if self.max_seconds:
            fractions.append(self.elapsed / self.max_seconds)
        return min(max(fractions), 1.0)

    def factor(self) -> float:
        step = max(self.last_epoch, 0)
        warm = 1.0 if step >= self.warmup_steps else (
            self.start_factor + (1 - self.start_factor) * step / self.warmup_steps)
        decayed = min(max((self.progress() - (1 - self.decay_fraction)) / self.decay_fraction, 0.0), 1.0)
        if self.shape == "cosine":
            decayed = 0.5 * (1 - math.cos(math.pi * decayed))
        return warm * (1 - (1 - self.final_factor) * decayed)

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base * factor for base in self.base_lrs]
