"""In-training FID on the EMA weights (a ``callbacks`` option), logged as a metric the trainer can monitor."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from difflab import all_ranks
from difflab.data.draw import draw
from difflab.data.draw import size as dataset_size
from difflab.diffusion.samplers import Sampler
from difflab.errors import UsageError
from difflab.evaluation import Scorer
from difflab.files import atomic_write
from difflab.lightning.callbacks import Periodic, save_and_log_grid
from difflab.lightning.compat import checkpoint_every_n_steps, record_metric
from difflab.metrics.features import AutoFeatures, choose_extractor, dataset_key, extract


class FIDCallback(Periodic):
    """Every ``every_n_steps`` optimizer steps (and at the end of training): the Fréchet distance between
    ``num_samples`` EMA samples and ``num_samples`` training images on ``extractor``'s features (``auto``: the
    digit classifier's for the digit data, Inception's otherwise), with its bootstrap interval.

    ``val/fid_<n>`` (the count is in the name: FIDs at different n are not comparable) is logged with
    ``self.log``, so ``callbacks.checkpoint.monitor=val/fid_<n>`` keeps the best checkpoints and EarlyStopping can
    watch it, and it ends up in metrics.json; ``val/fid_<n>_low`` / ``_high`` bound it. Samples use ``sampler``
    (default: the module's) through the module's ``pipeline()`` and, for conditional models, the conditioner's
    balanced ``examples`` with the module's guidance scale. The real features are computed once and cached in
    ``cache_dir`` under a key of dataset (and its files), split, resolution, extractor and n. Under DDP every rank
    samples its share (``all_ranks.share``: the samples of one process, by seed) and the features are gathered on
    all ranks, which then log the same value.
    """

    def __init__(self, extractor: torch.nn.Module | AutoFeatures, every_n_steps: int = 1000, num_samples: int = 1000,
                 sampler: Sampler | None = None, batch_size: int = 250, seed: int = 0, cache_dir: str | None = None,
                 bootstrap: int = 200,  # resamples for the interval (0: none)
                 confidence: float = 0.95):
        super().__init__(every_n_steps)
        self.extractor, self.num_samples = extractor, num_samples
        self.sampler, self.batch_size, self.seed, self.cache_dir = sampler, batch_size, seed, cache_dir
        self.bootstrap, self.confidence = bootstrap, confidence
        self._at_end = False

    @property
    def metric_name(self) -> str:
        n = self.num_samples
        return f"val/fid_{n // 1000}k" if n % 1000 == 0 else f"val/fid_{n}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.num_samples < trainer.world_size:
            raise UsageError(f"callbacks.fid.num_samples={self.num_samples} on {trainer.world_size} processes: give "
                             "at least one sample per process")
        self.extractor, warning = choose_extractor(self.extractor, trainer.datamodule.train_set)
        if warning:
            rank_zero_warn(warning)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor == self.metric_name:
                self._check_monitor(callback)

    def _check_monitor(self, checkpoint: ModelCheckpoint) -> None:
        """A checkpoint kept by FID needs a FID of its own step: one computed earlier would be credited to it."""
        every = checkpoint_every_n_steps(checkpoint)
        if self.every_n_steps <= 0 or not every or every % self.every_n_steps:
            raise UsageError(f"callbacks.checkpoint.monitor={self.metric_name} needs a FID at every checkpoint step: "
                             f"set callbacks.fid.every_n_steps to a divisor of callbacks.checkpoint."
                             f"every_n_train_steps ({every}), now {self.every_n_steps}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_end = True  # Lightning allows no self.log here: the value is recorded directly
        try:
            super().on_train_end(trainer, pl_module)
        finally:
            self._at_end = False

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        start = time.perf_counter()
        real = self.real_features(trainer)
        fake, preview = self.sample_features(trainer, pl_module)
        name = self.metric_name
        # evaluate.py's Scorer on the features at hand: one FID (and interval) computation for both
        figures = Scorer(self.extractor, None, ("fid",), bootstrap=self.bootstrap, level=self.confidence,
                         seed=self.seed, real_features=real).score_features([fake]).sets[0]
        values = {name: figures["fid"]}
        if self.bootstrap:
            low, high = figures["fid_interval"]
            values.update({f"{name}_low": low, f"{name}_high": high})
        for key, value in values.items():  # for the trainer: checkpoint monitor, early stopping, metrics.json
            if self._at_end:
                record_metric(trainer, key, value)
            else:
                pl_module.log(key, value, on_step=True, on_epoch=False, logger=False)
        seconds = time.perf_counter() - start
        for logger in trainer.loggers:  # at this step exactly, whatever log_every_n_steps says
            logger.log_metrics({**values, f"{name}_seconds": seconds}, step=trainer.global_step)
        shown = f" [{values[name + '_low']:.4f}, {values[name + '_high']:.4f}]" if self.bootstrap else ""
        rank_zero_info(f"{name} = {values[name]:.4f}{shown} at step {trainer.global_step} ({seconds:.1f} s)")
        save_and_log_grid(trainer, preview, "fid_samples", "fid_samples")  # the samples behind the figure
        return values[name]

    def _cache_path(self, trainer: L.Trainer) -> Path:
        datamodule = trainer.datamodule
        size = datamodule.image_size
        count = dataset_size(datamodule.train_set) or "stream"  # shards: their first n samples; files in the key
        key = f"{dataset_key(datamodule.train_set)}_train{count}_seed{datamodule.split_seed}_" \
              f"{size}px_{self.extractor.name}_n{self.num_samples}.pt"
        root = Path(self.cache_dir) if self.cache_dir else Path(trainer.default_root_dir) / "fid_stats"
        return root / key

    def real_features(self, trainer: L.Trainer) -> Tensor:
        """The features (n, D) of n training images (the same n on every rank), cached on disk."""
        path = self._cache_path(trainer)
        if path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if "features" in cached:  # caches of older versions hold statistics only: recomputed
                return cached["features"]
        images = torch.stack([item["image"] for item in draw(trainer.datamodule.train_set, self.num_samples,
                                                             self.seed)])
        features = extract(self.extractor, images, self.batch_size)
        if trainer.is_global_zero:  # every rank computed the same features; one writes them, atomically
            with atomic_write(path) as tmp:
                torch.save({"features": features}, tmp)
        return features

    def sample_features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """The samples' features (n, D) (all ranks' samples) and this rank's first 64 samples (in [0, 1]): sample k
        has the seed seed + 1 + k and the k-th balanced condition, whatever the number of ranks."""
        part = all_ranks.share(self.num_samples)
        model = pl_module.diffusion_model()
        pipe = model.pipeline()
        conditions = model.conditioner.examples(self.num_samples, model.device)
        features, preview = [], None
        self.extractor.to(pl_module.device)
        for start in range(part.start, part.stop, self.batch_size):
            count = min(self.batch_size, part.stop - start)
            condition = {k: v[start:start + count] for k, v in conditions.items()} or None
            images = pipe(n=None if condition else count, condition=condition, sampler=self.sampler,
                          seed=[self.seed + 1 + start + k for k in range(count)], batch_size=count,
                          progress=False)
            features.append(self.extractor(images * 2 - 1).float())  # the extractors take [-1, 1]
            preview = images[:64] if preview is None else preview
        return all_ranks.gather(torch.cat(features)), preview
