"""A training run from a composed config (the composition root): ``build`` instantiates its parts, ``run`` fits
them and leaves the run's files behind. ``python train.py`` parses the command line and calls ``run``;
``difflab.train("data=digits", "network=tiny", run_dir="runs/a")`` composes the shipped config with the same
overrides and runs the same job, so a notebook or a script trains exactly what the command line would."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from difflab.errors import MissingFileError, UsageError
from difflab.files import remove_partial_writes, write_text
from difflab.pipeline import Pipeline

if TYPE_CHECKING:
    import lightning as L

    from difflab.lightning.last_checkpoint import LastCheckpoint


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


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate data, model, callbacks, loggers and trainer from a composed config (its ``auto`` data values
    read from the data first, in place, so that the saved config and the checkpoints hold them). The config is the
    user's own: Hydra's ``instantiate`` builds whatever it names (files read later go through ``registry``)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar

    from difflab.data.layout import resolve_folder_config
    from difflab.lightning import slurm
    from difflab.lightning.checkpoint_io import SafeCheckpointIO
    from difflab.lightning.strategies import strategy_from_name

    resolve_folder_config(cfg.data)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    # set after instantiation: passed through instantiate, its _target_ nodes would be built too
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    if cfg.get("ema") is not None:  # ema=posthoc: a callback of its own group
        callbacks.append(instantiate(cfg.ema))
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a progress bar it was told not to show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]
    if str(cfg.trainer.get("strategy", "")).startswith("fsdp"):  # Lightning's FSDP1 names: its EMA is not sharded
        raise UsageError(f"trainer.strategy={cfg.trainer.strategy} is Lightning's FSDP1, which difflab's EMA copy does "
                         "not work with: use trainer=fsdp (FSDP2, the EMA sharded like the weights)")
    # every checkpoint written atomically, never with non-finite weights, held while NaN steps are being skipped;
    # under SLURM, requeue is LastCheckpoint's (last.ckpt at a step's end), not Lightning's hpc_ckpt (slurm.py);
    # DDP whose ranks all stop when rank zero's checkpoint write fails
    extra = {"strategy": strategy_from_name(cfg.trainer.strategy)} \
        if isinstance(cfg.trainer.get("strategy"), str) else {}  # a node (trainer=fsdp) is built with the trainer
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          plugins=[SafeCheckpointIO(), *slurm.cluster_plugins()], **extra)
    return model, datamodule, trainer


def resume_path(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """``ckpt_path``: a file to resume from; ``auto``: this run directory's newest checkpoint, ``checkpoints/
    last.ckpt`` or an ``hpc_ckpt_<n>.ckpt`` Lightning's SLURM requeue left (a restarted or requeued job continues,
    a first run starts fresh; older hpc files are removed); null: start fresh."""
    from lightning.pytorch.utilities import rank_zero_info

    from difflab.lightning import slurm
    from difflab.lightning.last_checkpoint import LastCheckpoint

    if cfg.ckpt_path == "auto":
        newest = slurm.newest_checkpoint(LastCheckpoint.checkpoint_path(trainer), Path(trainer.default_root_dir))
        if newest is None:
            return None
        if trainer.is_global_zero:
            slurm.prune_hpc_checkpoints(Path(trainer.default_root_dir), keep=newest)
        rank_zero_info(f"resuming from {newest} (ckpt_path=auto: this run directory's newest checkpoint; "
                       "ckpt_path=null starts afresh)")
        return str(newest)
    if cfg.ckpt_path is not None and not os.path.exists(cfg.ckpt_path):
        raise MissingFileError(f"checkpoint to resume from not found: {cfg.ckpt_path}")
    if cfg.ckpt_path is not None and os.path.isdir(cfg.ckpt_path):
        # a sharded checkpoint's index is a pickle (torch.distributed.checkpoint): only this run's own are read,
        # by ckpt_path=auto
        raise UsageError(f"ckpt_path={cfg.ckpt_path} is a folder (a sharded checkpoint): its index is unpickled, "
                         "so only a run's own are resumed, with ckpt_path=auto in that run's directory")
    return cfg.ckpt_path


def warn_if_config_changed(previous: DictConfig, cfg: DictConfig) -> None:
    """ckpt_path=auto resumes whatever this run directory holds: say so when its run had another config (a longer
    ``trainer.max_steps`` is a usual reason; a reused directory for another experiment is not)."""
    from lightning.pytorch.utilities import rank_zero_warn

    after = _flatten(OmegaConf.to_container(cfg, resolve=True))
    # a moved or copied run directory: the paths under its old location read as the same paths under the new one
    moved_from, moved_to = previous.get("paths", {}).get("output_dir"), after.get("paths.output_dir")
    before = {key: value.replace(moved_from, moved_to) if isinstance(value, str) and moved_from else value
              for key, value in _flatten(OmegaConf.to_container(previous, resolve=False)).items()}
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and not k.startswith(("paths.", "ckpt_path")))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        rank_zero_warn(f"resuming a run whose config differs from this one: {shown}{more}. To start afresh, "
                       "use another run directory or ckpt_path=null.")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def task_overrides() -> list[str]:
    """The command line's overrides of this job (a multirun: this point's), as Hydra recorded them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def stopped_by_signal(trainer: L.Trainer) -> LastCheckpoint | None:
    """The callback that stopped training on a preemption signal, if one did."""
    from difflab.lightning.last_checkpoint import LastCheckpoint

    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint) and c.interrupted), None)


def run(cfg: DictConfig) -> L.Trainer:
    """Train as ``python train.py`` does: seed, build, hold the run directory, fit (resuming per ``ckpt_path``). A
    latent model given no first stage fits its autoencoder first (``difflab.first_stage_training``)."""
    import lightning as L

    from difflab import first_stage_training

    # the EMA copy is meant to stay in eval mode while the network trains
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # lightning 2.6 on torch 2.14 warns about its own pytree use at every fit: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if first_stage_training.wanted(cfg):  # model=ldm given no first stage: fit (or reuse) an autoencoder first
        cfg, stopped = first_stage_training.prepare(cfg)
        if stopped is not None:
            return stopped
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in config.yaml; stderr stays for errors
    model, datamodule, trainer = build(cfg)
    with locked_run_directory(trainer):
        fit(cfg, model, datamodule, trainer)
    return trainer


def fit(cfg: DictConfig, model: L.LightningModule, datamodule: L.LightningDataModule, trainer: L.Trainer) -> None:
    """Resume or start, train, and write what a finished (or preempted) run leaves behind."""
    from difflab.lightning.loggers import finish_wandb_runs

    ckpt_path = resume_path(cfg, trainer)
    if ckpt_path is not None:  # a resumed run's checkpoints folder holds checkpoints: that is the point
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    config_file = os.path.join(trainer.default_root_dir, "config.yaml")
    if trainer.is_global_zero:
        if ckpt_path is not None and cfg.ckpt_path == "auto" and os.path.isfile(config_file):
            warn_if_config_changed(OmegaConf.load(config_file), cfg)
        write_text(config_file, OmegaConf.to_yaml(cfg, resolve=True))
        # a finished run writes it again; a stale one would read as this run's result
        Path(trainer.default_root_dir, METRICS_FILE).unlink(missing_ok=True)
    for logger in trainer.loggers:  # the composed config on every dashboard (hparams.yaml, W&B config, ...)
        logger.log_hyperparams(model.run_config)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb_runs(trainer.loggers)
    if trainer.is_global_zero:  # hpc_ckpt files an older requeue left: last.ckpt is newer now
        from difflab.lightning import slurm
        from difflab.lightning.last_checkpoint import LastCheckpoint

        slurm.prune_hpc_checkpoints(Path(trainer.default_root_dir), keep=LastCheckpoint.checkpoint_path(trainer))
    stopped = stopped_by_signal(trainer)
    if stopped is not None:  # preempted: last.ckpt is written; the signal's owner (submitit: requeue) acts now
        stopped.pass_on_signal()
    elif trainer.is_global_zero:  # a finished run's final metrics, for sweep summaries
        write_final_metrics(trainer.default_root_dir, trainer.callback_metrics, trainer.global_step,
                            task_overrides())


@contextmanager
def locked_run_directory(trainer: L.Trainer) -> Iterator[None]:
    """On global rank zero, hold the run directory's lock while training (a second live process there is refused,
    a dead one's lock taken over) and clear the partial files a killed predecessor left. When a scheduler started
    every rank, they form the process group first, so that a refusal stops all of them."""
    from lightning.pytorch.utilities import rank_zero_info

    from difflab.all_ranks import fail_together
    from difflab.lightning.last_checkpoint import LastCheckpoint
    from difflab.run_lock import RunLock

    if all_ranks_started_by_scheduler(trainer):  # SLURM, torchrun: every rank must hear rank zero's refusal
        trainer.strategy.setup_environment()  # the process group, early (fit finds it made)
        lock, error = None, None
        if trainer.is_global_zero:
            try:
                lock = RunLock(trainer.default_root_dir).acquire()
            except Exception as err:  # whatever it is, the other ranks must not wait for rank zero
                error = err
        fail_together(error, trainer.strategy.root_device)
    elif trainer.is_global_zero:  # one process, or rank zero before it starts the others
        lock = RunLock(trainer.default_root_dir).acquire()
    else:
        lock = None
    if lock is None:
        yield
        return
    try:
        if lock.took_over is not None:
            rank_zero_info(f"took over the run directory from process {lock.took_over.get('pid')} on "
                           f"{lock.took_over.get('host')}, which is no longer running")
        for folder in (trainer.default_root_dir, LastCheckpoint.checkpoint_path(trainer).parent):
            remove_partial_writes(folder)
        yield
    finally:
        lock.release()


def all_ranks_started_by_scheduler(trainer: L.Trainer) -> bool:
    """Whether every rank of this multi-process run was started by SLURM, torchrun, MPI, ... (each runs this code),
    rather than by Lightning's launcher from rank zero (which then takes the run lock before the others exist)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    from difflab.lightning.compat import cluster_environment

    environment = cluster_environment(trainer)
    return trainer.world_size > 1 and environment is not None and environment.creates_processes_externally \
        and not isinstance(environment, LightningEnvironment)


METRICS_FILE = "metrics.json"


def write_final_metrics(run_dir: str | os.PathLike, metrics: dict, global_step: int,
                        overrides: list[str]) -> Path:
    """``run_dir/metrics.json``: the run's last value of each logged metric, its step and its overrides."""
    values = {}
    for key, value in metrics.items():
        value = float(value)
        values[key] = value if math.isfinite(value) else str(value)  # JSON has no nan / inf
    path = Path(run_dir) / METRICS_FILE
    write_text(path, json.dumps({"global_step": global_step, "overrides": list(overrides), "metrics": values},
                                indent=2) + "\n")
    return path


def train(*overrides: str, run_dir: str | Path, progress: bool = True) -> TrainedRun:
    """Train as ``python train.py OVERRIDES`` would, writing into ``run_dir`` (resumed if it holds a run, as
    ``ckpt_path=auto``). ``progress=False`` hides the progress bar (logs and scripts)."""
    run_dir = Path(run_dir).expanduser().resolve()
    extra = [f"paths.output_dir={run_dir}"]
    if not progress:
        extra += ["trainer.enable_progress_bar=false"]
    cfg = compose(*extra, *overrides)
    trainer = run(cfg)
    return TrainedRun(trainer.lightning_module, trainer, run_dir)


__all__ = ["TrainedRun", "build", "compose", "run", "train"]
