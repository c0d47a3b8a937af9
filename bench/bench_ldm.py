"""Training images/s of latent diffusion against pixel diffusion on MNIST, measured in one run.

    python bench/bench_ldm.py [--steps 20] [--rounds 2]

Each configuration runs the same training step (class condition with 10 % dropped, t and noise, loss,
backward, AdamW, EMA update) at batch 64:
  pixel          the default: network=small on 1x32x32 images
  latent/same    network=small's width (16, 32, 64 channels) on the 4x8x8 latents of the f = 4 autoencoder,
                 encoding every batch (cache_latents=false) or with cached posteriors (true)
  latent/preset  model=ldm's network (latent_small: 64, 128 channels, attention at both levels), both ways
The configurations take turns (rounds), so that the shared machine's speed swings hit all of them. The
autoencoder is the model=autoencoder architecture, randomly initialised (its speed does not depend on
its weights). Ratios are images/s over the pixel model's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.conf import CONFIG_DIR
from difflab.diffusion.guidance import Conditioned


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tempfile.gettempdir()}", *overrides])


def autoencoder_checkpoint(folder: Path) -> Path:
    cfg = config("model=autoencoder")
    module = instantiate(cfg.model, _convert_="all")
    path = folder / "autoencoder.ckpt"
    torch.save({"state_dict": module.state_dict(), "difflab_config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


class Run:
    """One configuration's model, optimizer and data, stepped on demand."""

    def __init__(self, name: str, cfg):
        torch.manual_seed(0)
        self.name = name
        self.model = instantiate(cfg.model, _convert_="all")
        self.optimizer = torch.optim.AdamW(self.model.network.parameters(), lr=1e-4)
        datamodule = instantiate(cfg.data)
        self.batches = list(datamodule.train_dataloader())
        self.images, self.seconds, self.position = 0, 0.0, 0
        start = time.perf_counter()
        if getattr(self.model, "cache_latents", False):  # the first epoch's one-off encoding
            for batch in self.batches:
                self.model.diffusion_input(batch)
        self.cache_seconds = time.perf_counter() - start
        self.params = sum(p.numel() for p in self.model.network.parameters())

    def step(self) -> None:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        condition = self.model.conditioner.training_condition(batch)
        x0 = self.model.diffusion_input(batch)
        loss = self.model.loss(Conditioned(self.model.network, condition), x0, self.model.schedule).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.update_ema()

    def time(self, steps: int) -> None:
        self.step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.seconds += time.perf_counter() - start
        self.images += steps * len(self.batches[0]["image"])

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())
    ckpt = autoencoder_checkpoint(Path(tempfile.mkdtemp()))
    ldm = ["model=ldm", f"first_stage.ckpt={ckpt}"]
    runs = [
        Run("pixel (network=small, 1x32x32)", config()),
        Run("latent/same width, encode each batch", config(*ldm, "network=small", "network.in_channels=4",
                                                           "model.cache_latents=false")),
        Run("latent/same width, cached latents", config(*ldm, "network=small", "network.in_channels=4")),
        Run("latent/preset (latent_small), encode", config(*ldm, "model.cache_latents=false")),
        Run("latent/preset (latent_small), cached", config(*ldm)),
    ]
    for _ in range(args.rounds):
        for run in runs:
            run.time(args.steps)
    pixel = runs[0].rate
    print(f"{'configuration':<40} {'params':>8} {'img/s':>8} {'vs pixel':>9} {'cache fill':>11}")
    for run in runs:
        fill = f"{run.cache_seconds:.1f} s" if run.cache_seconds > 0.05 else "-"
        print(f"{run.name:<40} {run.params / 1e3:>7.0f}K {run.rate:>8.1f} {run.rate / pixel:>8.2f}x {fill:>11}")


if __name__ == "__main__":
    main()
