"""``model=ldm`` given no first stage: fit an autoencoder on the run's own data first (the ``model=autoencoder``
recipe) in part of the run's budget, then train the latent model on it. The autoencoder is a run of its own in
``<run dir>/first_stage/`` (resumed like any run), and is copied into a cache keyed on the data's files and its
config, so the next ``model=ldm`` run on the same data reuses it and gives the latent model the whole budget."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf, open_dict

from difflab.data.fingerprint import data_fingerprint
from difflab.files import atomic_write, write_text
from difflab.lr_schedule import duration_seconds
from difflab.registry import target_of

if TYPE_CHECKING:
    import lightning as L

LOAD_FIRST_STAGE = "difflab.latent.load_first_stage"
STAGE_DIR = "first_stage"  # the autoencoder's run directory, inside the latent run's
RECORD = "source.json"  # in it: whether this run trained its autoencoder or took it from the cache, and the key
# callbacks of a diffusion model that an autoencoder run has no use for
DIFFUSION_ONLY_CALLBACKS = ("difflab.lightning.fid.", "difflab.lightning.probes.")


def wanted(cfg: DictConfig) -> bool:
    """A latent model whose first stage is difflab's loader with neither ``ckpt`` nor ``pretrained`` given."""
    node = OmegaConf.select(cfg, "model.first_stage")
    return (isinstance(node, DictConfig) and "first_stage_training" in cfg
            and target_of(node) == LOAD_FIRST_STAGE
            and node.get("ckpt") is None and node.get("pretrained") is None)


def prepare(cfg: DictConfig) -> tuple[DictConfig | None, L.Trainer | None]:
    """(the latent run's config, its ``first_stage.ckpt`` set, None) once the autoencoder is trained, reused from
    this run directory or taken from the cache; (None, the autoencoder's trainer) if a signal stopped its training
    (its last.ckpt is written: the requeued job resumes it)."""
    from lightning.pytorch.utilities import rank_zero_info

    from difflab.training import run, stopped_by_signal

    settings = cfg.first_stage_training
    stage_dir = Path(cfg.paths.output_dir) / STAGE_DIR
    checkpoint = stage_dir / "checkpoints" / "last.ckpt"
    record = stage_dir / RECORD
    stage_cfg = autoencoder_config(cfg, stage_dir)
    key = cache_key(cfg, stage_cfg)
    cached = Path(settings.cache_dir).expanduser() / key / "last.ckpt" if settings.cache_dir else None
    total = _describe_budget(cfg.trainer)
    if cfg.ckpt_path is not None and record.is_file() and checkpoint.is_file():  # a resumed run: its own
        trained_here = bool(json.loads(record.read_text()).get("trained"))
        rank_zero_info(f"model=ldm: the autoencoder of this run directory, {checkpoint}")
    elif cached is not None and cached.is_file():
        trained_here = False
        if _is_global_zero():
            with atomic_write(checkpoint, sync=True) as tmp:
                shutil.copyfile(cached, tmp)
            write_text(record, json.dumps({"trained": False, "cache_key": key, "copied_from": str(cached)}) + "\n")
        rank_zero_info(f"model=ldm: reusing the autoencoder trained on this data before ({cached}); the latent "
                       f"model gets the whole budget, {total}")
    else:
        trained_here = True
        rank_zero_info(
            f"model=ldm with no first stage given: fitting an autoencoder on the data first, in "
            f"{_describe_budget(stage_cfg.trainer)} of the run's {total} (first_stage_training.budget="
            f"{settings.budget}), then the latent model in {_describe_budget(_split(cfg, settings.budget).trainer)}. "
            f"It is kept in {stage_dir}"
            + (f" and cached for later runs on this data in {cached.parent}" if cached is not None else "")
            + "; first_stage.ckpt=PATH uses one you have")
        trainer = run(stage_cfg)
        if stopped_by_signal(trainer) is not None:
            return None, trainer
        if trainer.is_global_zero:
            write_text(record, json.dumps({"trained": True, "cache_key": key}) + "\n")
            if cached is not None:
                _store(checkpoint, cached, cfg)
    latent = _split(cfg, settings.budget) if trained_here else copy.deepcopy(cfg)
    with open_dict(latent):
        # an interpolation: a moved run directory still finds its own autoencoder
        latent.first_stage.ckpt = "${paths.output_dir}/" + f"{STAGE_DIR}/checkpoints/last.ckpt"
    return latent, None


def _store(checkpoint: Path, cached: Path, cfg: DictConfig) -> None:
    """Copy the trained autoencoder into the cache; a cache that cannot be written (full, read-only) is warned
    about, and the run goes on with the autoencoder in its own directory."""
    from lightning.pytorch.utilities import rank_zero_warn

    try:
        with atomic_write(cached, sync=True) as tmp:
            shutil.copyfile(checkpoint, tmp)
        write_text(cached.parent / "data.json", json.dumps(
            OmegaConf.to_container(cfg.data, resolve=True), indent=2, default=str) + "\n")
    except OSError as err:
        rank_zero_warn(f"could not cache the autoencoder in {cached.parent} ({err.strerror or err}); it is kept in "
                       f"{checkpoint}, and the next run on this data trains its own")


def autoencoder_config(cfg: DictConfig, stage_dir: Path) -> DictConfig:
    """The run's config with the autoencoder as its model, ``budget`` of its trainer's time and steps, its own run
    directory (resumed by ``ckpt_path=auto`` as any run) and the callbacks that apply to an autoencoder."""
    settings = cfg.first_stage_training
    stage = _scaled_budget(cfg, settings.budget)
    with open_dict(stage):
        stage.model = copy.deepcopy(settings.model)
        del stage.first_stage_training
        del stage.first_stage
        stage.paths.output_dir = str(stage_dir)
        stage.ckpt_path = "auto" if cfg.ckpt_path is not None else None
        callbacks = stage.get("callbacks") or {}
        for name in [name for name, node in callbacks.items()
                     if str(target_of(node) or "").startswith(DIFFUSION_ONLY_CALLBACKS)]:
            del callbacks[name]
    return stage


def cache_key(cfg: DictConfig, stage_cfg: DictConfig) -> str:
    """What decides the autoencoder: the data's files and config, the autoencoder's config, its budget, the seed."""
    trainer = {k: v for k, v in OmegaConf.to_container(stage_cfg.trainer, resolve=True).items()
               if k not in ("default_root_dir", "enable_progress_bar", "log_every_n_steps")}
    described = {"data": data_fingerprint(OmegaConf.to_container(cfg.data, resolve=True)),
                 "model": OmegaConf.to_container(stage_cfg.model, resolve=True),
                 "trainer": trainer, "seed": cfg.get("seed")}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _split(cfg: DictConfig, fraction: float) -> DictConfig:
    """The latent model's share of the budget: what the autoencoder's ``fraction`` leaves."""
    return _scaled_budget(cfg, fraction, remainder=True)


def _scaled_budget(cfg: DictConfig, fraction: float, remainder: bool = False) -> DictConfig:
    """A copy of the config whose ``trainer.max_time`` and ``max_steps`` are ``fraction`` of the run's (or, with
    ``remainder``, what that fraction leaves); an unlimited one (null, -1) stays unlimited."""
    if not 0 < float(fraction) < 1:
        from difflab.errors import UsageError

        raise UsageError(f"first_stage_training.budget={fraction}: the autoencoder's share of the run's budget must "
                         "be between 0 and 1 (e.g. 0.3)")
    scaled = copy.deepcopy(cfg)
    share = 1 - float(fraction) if remainder else float(fraction)
    with open_dict(scaled):
        seconds = _seconds(cfg.trainer.get("max_time"))
        if seconds is not None:
            scaled.trainer.max_time = _clock(max(1, round(seconds * share)))
        steps = cfg.trainer.get("max_steps")
        if steps is not None and steps > 0:
            part = max(1, round(steps * float(fraction)))
            scaled.trainer.max_steps = max(1, steps - part) if remainder else part
    return scaled


def _seconds(max_time) -> int | None:
    seconds = duration_seconds(OmegaConf.to_container(max_time) if isinstance(max_time, DictConfig) else max_time)
    return None if seconds is None else round(seconds)


def _clock(seconds: int) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    day, hour = divmod(hours, 24)
    return f"{day:02d}:{hour:02d}:{minute:02d}:{second:02d}"


def _describe_budget(trainer: DictConfig) -> str:
    seconds, steps = _seconds(trainer.get("max_time")), trainer.get("max_steps")
    parts = [f"{seconds // 60} min {seconds % 60} s" if seconds is not None else None,
             f"{steps} steps" if steps is not None and steps > 0 else None]
    return ", at most ".join(p for p in parts if p) or "an unlimited budget"


def _is_global_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
