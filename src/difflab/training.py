"""Training from Python: ``difflab.train("data=digits", "network=tiny", run_dir="runs/a")`` composes the shipped
config with the same overrides ``python train.py`` takes and runs the same job (checkpoints, samples, metrics.csv in
``run_dir``), so a notebook or a script trains exactly what the command line would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from difflab.pipeline import Pipeline


@dataclass
class TrainedRun:
    """What ``difflab.train`` returns: the trained LightningModule, its Trainer and the run directory."""

    module: object  # the LightningModule (DiffusionModule, ...), trained
    trainer: object
    dir: Path

    @property
    def last_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "last.ckpt"

    def pipeline(self, use_ema: bool = True) -> Pipeline:
        """The trained model's Pipeline (EMA weights by default), as ``difflab.load(run.last_checkpoint)`` gives."""
        return self.module.pipeline(use_ema=use_ema)

    def metrics(self) -> dict[str, list[tuple[int, float]]]:
        """The run's logged metrics (CSV logger): name -> [(step, value), ...]."""
        from difflab.plots import read_metrics

        return read_metrics(self.dir)


def compose(*overrides: str, config_name: str = "train") -> DictConfig:
    """The shipped ``conf/<config_name>.yaml`` composed with command-line style overrides (``"schedule=linear"``,
    ``"trainer.max_steps=300"``), as the entry point composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # a notebook that composed before, or a Hydra app calling us
        GlobalHydra.instance().clear()
    with initialize_config_module("difflab.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def train(*overrides: str, run_dir: str | Path, progress: bool = True) -> TrainedRun:
    """Train as ``python train.py OVERRIDES`` would, writing into ``run_dir`` (resumed if it holds a run, as
    ``ckpt_path=auto``). ``progress=False`` hides the progress bar (logs and scripts)."""
    from difflab.cli.train import run

    run_dir = Path(run_dir).expanduser().resolve()
    extra = [f"paths.output_dir={run_dir}"]
    if not progress:
        extra += ["trainer.enable_progress_bar=false"]
    cfg = compose(*extra, *overrides)
    trainer = run(cfg)
    return TrainedRun(trainer.lightning_module, trainer, run_dir)


__all__ = ["TrainedRun", "compose", "train"]
