"""Latent diffusion (Rombach et al. 2022): the diffusion module on the latents of a frozen first stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from difflab.errors import UsageError
from difflab.files import atomic_write
from difflab.latent.first_stage import FirstStage
from difflab.lightning.diffusion_module import DiffusionModule


class LatentDiffusionModule(DiffusionModule):
    """``DiffusionModule`` whose diffusion runs on ``first_stage`` latents: training encodes each batch (a
    posterior sample, times the scale factor), sampling and editing decode at the end. The first stage is a
    frozen part of the model: saved in the checkpoint with its architecture (``spec``), so the trained model
    samples without the autoencoder's original file; never optimised, never in train mode.

    ``cache_latents``: keep each training image's posterior (mean, std) in memory after its first encoding and
    draw z from it afterwards (for datasets without random augmentation; batches need their ``index``).
    ``latent_cache_dir``: also save that cache there after every epoch and load it at the start of the next
    run, in a file named by a fingerprint of the first stage's weights, the dataset and the image size (a
    different autoencoder or dataset never reads another's latents).
    """

    def __init__(self, first_stage: FirstStage, image_size: int, cache_latents: bool = False,
                 latent_cache_dir: str | None = None, **kwargs):
        kwargs["image_shape"] = None  # the latent shape, from the first stage and image_size
        super().__init__(**kwargs, first_stage=first_stage, image_size=image_size)
        self.image_size = image_size
        self.cache_latents = cache_latents or latent_cache_dir is not None
        self.latent_cache_dir = latent_cache_dir
        self._latent_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._saved_cache_size = 0
        self._latent_cache_path: Path | None = None
        network_channels = getattr(self.network, "in_channels", first_stage.latent_channels)
        if network_channels != first_stage.latent_channels:
            raise UsageError(f"the network takes {network_channels}-channel inputs but the first stage's latents have "
                             f"{first_stage.latent_channels} channels: set network.in_channels="
                             f"{first_stage.latent_channels}")

    # ---- the diffusion space ------------------------------------------------------------------------

    @torch.no_grad()
    def diffusion_input(self, batch: dict) -> Tensor:
        images = batch["image"]
        if not self.cache_latents:
            return self.first_stage.encode(images, sample=True)
        if "index" not in batch:
            raise ValueError("cache_latents needs the dataset index in each batch (batch['index'])")
        indices = batch["index"].tolist()
        missing = [k for k, i in enumerate(indices) if i not in self._latent_cache]
        if missing:
            mean, std = self.first_stage.scaled_moments(images[missing])
            for k, m, s in zip(missing, mean, std, strict=True):
                self._latent_cache[indices[k]] = (m, s)
        mean = torch.stack([self._latent_cache[i][0] for i in indices])
        std = torch.stack([self._latent_cache[i][1] for i in indices])
        return mean + std * torch.randn_like(mean)

    # ---- the latent cache on disk ------------------------------------------------------------------

    def latent_cache_path(self) -> Path:
        """The cache file; hashing the first stage's weights is done once per fit (an SD VAE is 330 MB)."""
        if self._latent_cache_path is None:
            self._latent_cache_path = self._fingerprinted_path()
        return self._latent_cache_path

    def _fingerprinted_path(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.first_stage.spec(), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.first_stage.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        dataset = getattr(datamodule, "dataset", None)
        label = getattr(dataset, "name", "dataset")
        # the files' listing too: a folder whose images changed must not reuse the old latents
        digest.update(f"{label}/{getattr(dataset, 'fingerprint', '')}/{self.image_size}".encode())
        rank = self.global_rank if self._trainer is not None else 0
        return Path(self.latent_cache_dir) / f"latents_{label}_{digest.hexdigest()[:16]}_rank{rank}.pt"

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._latent_cache_path = None  # a new fit may see another dataset
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.cache_latents and getattr(getattr(datamodule, "dataset", None), "random_flip", False):
            rank_zero_warn("cache_latents is off: the dataset flips images at random, and a cached latent would "
                           "freeze one flip (set data.dataset.random_flip=false to cache)")
            self.cache_latents, self.latent_cache_dir = False, None
        if self.latent_cache_dir is None:
            return
        path = self.latent_cache_path()
        if path.is_file():
            saved = torch.load(path, map_location=self.device, weights_only=True)
            for i, mean, std in zip(saved["index"].tolist(), saved["mean"], saved["std"], strict=True):
                self._latent_cache[i] = (mean, std)
            self._saved_cache_size = len(self._latent_cache)

    def on_train_epoch_end(self) -> None:
        if self.latent_cache_dir is None or len(self._latent_cache) == self._saved_cache_size:
            return
        indices = sorted(self._latent_cache)
        with atomic_write(self.latent_cache_path()) as tmp:  # an interrupted save leaves the previous file
            torch.save({"index": torch.tensor(indices),
                        "mean": torch.stack([self._latent_cache[i][0] for i in indices]),
                        "std": torch.stack([self._latent_cache[i][1] for i in indices])}, tmp)
        self._saved_cache_size = len(indices)
