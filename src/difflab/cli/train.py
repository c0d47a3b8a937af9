"""``python train.py [group=option ...]``: compose the config and train it (``difflab.training.run``)."""

from __future__ import annotations

from omegaconf import DictConfig

from difflab.cli.errors import hydra_main
from difflab.training import build, fit, resume_path, run, stopped_by_signal

__all__ = ["build", "fit", "main", "resume_path", "run"]


@hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    """Returns the final ``val/loss``: the objective Hydra's optimizing sweepers (Optuna, Ax, Nevergrad) minimize."""
    trainer = run(cfg)
    value = trainer.callback_metrics.get("val/loss")
    # a preempted run has no final value: an optimizing sweeper must not score it
    return None if value is None or stopped_by_signal(trainer) is not None else float(value)


if __name__ == "__main__":
    main()
