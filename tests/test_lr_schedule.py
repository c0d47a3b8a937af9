"""lr_scheduler=budget: warm-up, then a decay over the run's step or wall-clock budget, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from configs import compose_config
from difflab.errors import UsageError
from difflab.lr_schedule import BudgetLR, duration_seconds


class Clock:
    """A settable stand-in for time.monotonic."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def optimizer(lr: float = 2.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def run(scheduler: BudgetLR, clock: Clock, steps: int, seconds_per_step: float) -> list[float]:
    """The learning rate of each of ``steps`` optimizer steps, each taking ``seconds_per_step``."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        clock.now += seconds_per_step
        scheduler.step()
    return rates


def test_durations_in_lightnings_forms():
    assert duration_seconds("00:00:12:00") == 720 == duration_seconds({"minutes": 12}) == duration_seconds(720)
    assert duration_seconds("01:02:00:30") == 86400 + 7200 + 30
    assert duration_seconds(None) is None
    with pytest.raises(UsageError, match="DD:HH:MM:SS"):
        duration_seconds("12:00")


def test_time_budget_linear_decay():
    """One second per step, 100 s of budget, 10 warm-up steps: the closed form at every step, zero at the end."""
    clock = Clock()
    scheduler = BudgetLR(optimizer(), warmup_steps=10, max_steps=100_000, max_time=100, clock=clock)
    rates = run(scheduler, clock, 120, 1.0)
    for step, rate in enumerate(rates):
        elapsed = step  # the clock starts when the scheduler is made (the start of fit)
        warm = min(0.01 + 0.99 * step / 10, 1.0)
        assert rate == pytest.approx(2.0 * warm * max(1 - elapsed / 100, 0.0), abs=1e-12), step
    assert rates[50] == pytest.approx(1.0)
    assert rates[-1] == 0.0


def test_the_budget_that_ends_first_sets_the_pace():
    clock = Clock()
    scheduler = BudgetLR(optimizer(), warmup_steps=0, max_steps=40, max_time=1000, clock=clock)
    rates = run(scheduler, clock, 41, 1.0)
    assert rates[20] == pytest.approx(1.0) and rates[40] == 0.0  # the steps ran out long before the 1000 s


def test_cosine_and_warmup_stable_decay():
    clock = Clock()
    cosine = BudgetLR(optimizer(), warmup_steps=0, max_steps=100, shape="cosine", final_factor=0.1, clock=clock)
    rates = run(cosine, clock, 101, 0.0)
    for step in (0, 25, 50, 90, 100):
        assert rates[step] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 100))))
    wsd = BudgetLR(optimizer(), warmup_steps=0, max_steps=100, decay_fraction=0.2, clock=Clock())
    rates = run(wsd, Clock(), 101, 0.0)
    assert rates[:81] == [2.0] * 81 and rates[90] == pytest.approx(1.0) and rates[100] == pytest.approx(0.0, abs=1e-12)


def test_resume_continues_from_the_saved_elapsed_time():
    """A restarted run picks up the elapsed time it saved; the hour between save and resume is not training."""
    clock = Clock()
    scheduler = BudgetLR(optimizer(), warmup_steps=0, max_steps=100_000, max_time=100, clock=clock)
    run(scheduler, clock, 31, 1.0)
    state, optimizer_state = scheduler.state_dict(), scheduler.optimizer.state_dict()
    assert "clock" not in state and "_last_tick" not in state and state["elapsed"] == 31
    clock.now += 3600
    resumed = BudgetLR(optimizer(), warmup_steps=0, max_steps=100_000, max_time=100, clock=clock)
    resumed.optimizer.load_state_dict(optimizer_state)  # as Lightning restores a checkpoint
    resumed.load_state_dict(state)
    rates = run(resumed, clock, 3, 1.0)
    # the saved rate, then one second per step again from the resumed 31 (the clock restarted at the resume)
    assert rates == pytest.approx([2.0 * (1 - 31 / 100), 2.0 * (1 - 32 / 100), 2.0 * (1 - 33 / 100)])


def test_refusals():
    with pytest.raises(UsageError, match="trainer.max_steps or trainer.max_time"):
        BudgetLR(optimizer(), max_steps=-1, max_time=None)
    with pytest.raises(UsageError, match="shape"):
        BudgetLR(optimizer(), max_steps=10, shape="step")
    with pytest.raises(UsageError, match="decay_fraction"):
        BudgetLR(optimizer(), max_steps=10, decay_fraction=0)


def test_the_config_reads_the_trainers_budget():
    cfg = compose_config("train", "lr_scheduler=budget", "trainer.max_time=00:00:05:00", "trainer.max_steps=-1")
    scheduler = instantiate(cfg.lr_scheduler)(optimizer())
    assert isinstance(scheduler, BudgetLR) and scheduler.max_seconds == 300 and scheduler.max_steps is None
