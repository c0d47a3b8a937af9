"""In-training FID on the EMA weights (a ``callbacks`` option)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from difflab.diffusion.samplers import Sampler
from difflab.files import atomic_write
from difflab.lightning.callbacks import Periodic, save_and_log_grid
from difflab.metrics.features import feature_statistics
from difflab.metrics.frechet import FeatureStatistics, frechet_distance_of


class FIDCallback(Periodic):
    """Every ``every_n_steps`` optimizer steps (and at the end of training): the Fréchet distance between
    ``num_samples`` EMA samples and ``num_samples`` training images, on ``extractor``'s features, logged as
    ``val/fid_<n>`` (the count is in the name: FIDs at different n are not comparable).

    Samples use ``sampler`` (default: the module's) through the module's ``pipeline()``
    and, for conditional models, the conditioner's
    balanced ``examples`` with the module's guidance scale. The real statistics are computed once and cached
    in ``cache_dir`` under a key of dataset, split, resolution, extractor and n. Under DDP every rank samples
    its share with its own seed and the features are gathered on all ranks: no collective runs on one rank alone.
    """

    def __init__(self, extractor: torch.nn.Module, every_n_steps: int = 1000, num_samples: int = 1000,
                 sampler: Sampler | None = None, batch_size: int = 250, seed: int = 0, cache_dir: str | None = None):
        super().__init__(every_n_steps)
        self.extractor, self.num_samples = extractor, num_samples
        self.sampler, self.batch_size, self.seed, self.cache_dir = sampler, batch_size, seed, cache_dir

    @property
    def metric_name(self) -> str:
        n = self.num_samples
        return f"val/fid_{n // 1000}k" if n % 1000 == 0 else f"val/fid_{n}"

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        start = time.perf_counter()
        real = self.real_statistics(trainer)
        fake, preview = self.sample_statistics(trainer, pl_module)
        value = frechet_distance_of(real, fake)
        seconds = time.perf_counter() - start
        for logger in trainer.loggers:
            logger.log_metrics({self.metric_name: value, f"{self.metric_name}_seconds": seconds},
                               step=trainer.global_step)
        rank_zero_info(f"{self.metric_name} = {value:.4f} at step {trainer.global_step} ({seconds:.1f} s)")
        save_and_log_grid(trainer, preview, "fid_samples", "fid_samples")  # the samples behind the figure
        return value

    def _cache_path(self, trainer: L.Trainer) -> Path:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule.train_set, "dataset", datamodule.train_set)
        name = getattr(dataset, "name", type(dataset).__name__)
        size = datamodule.image_size
        key = f"{name}_train{len(datamodule.train_set)}_seed{datamodule.split_seed}_{size}px_{self.extractor.name}_" \
              f"n{self.num_samples}.pt"
        root = Path(self.cache_dir) if self.cache_dir else Path(trainer.default_root_dir) / "fid_stats"
        return root / key

    def real_statistics(self, trainer: L.Trainer) -> FeatureStatistics:
        path = self._cache_path(trainer)
        if path.is_file():
            return FeatureStatistics.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        train_set = trainer.datamodule.train_set
        n = min(self.num_samples, len(train_set))
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(self.seed))[:n]
        images = torch.stack([train_set[int(i)]["image"] for i in order])
        stats = feature_statistics(self.extractor, images, self.batch_size)
        if trainer.is_global_zero:  # every rank computed the same statistics; one writes them, atomically
            with atomic_write(path) as tmp:
                torch.save(stats.state_dict(), tmp)
        return stats

    def sample_statistics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[FeatureStatistics, Tensor]:
        """The samples' statistics (all ranks' samples) and this rank's first 64 samples (in [0, 1])."""
        world, rank = trainer.world_size, trainer.global_rank
        share = -(-self.num_samples // world)  # every rank the same count: all_gather needs equal shapes
        pipe = pl_module.pipeline()
        conditions = pl_module.conditioner.examples(share * world, pl_module.device)
        features, preview = [], None
        self.extractor.to(pl_module.device)
        for start in range(0, share, self.batch_size):
            count = min(self.batch_size, share - start)
            first = rank * share + start  # sample k of the whole set has the seed seed + 1 + k on every rank layout
            condition = {k: v[first:first + count] for k, v in conditions.items()} or None
            images = pipe(n=None if condition else count, condition=condition, sampler=self.sampler,
                          seed=[self.seed + 1 + first + k for k in range(count)], batch_size=count,
                          progress=False)
            features.append(self.extractor(images * 2 - 1))  # the extractors take [-1, 1]
            preview = images[:64] if preview is None else preview
        local = torch.cat(features)
        gathered = pl_module.all_gather(local)  # (world, share, D) under DDP, (share, D) alone
        gathered = gathered.reshape(-1, local.shape[-1])[: self.num_samples]
        return FeatureStatistics.of(gathered), preview

