"""What the probes share: a grid of timesteps, noised inputs with fixed noise, and a batch of real images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.pipeline import Pipeline


def timestep_grid(num_timesteps: int, count: int = 10) -> list[int]:
    """``count`` timesteps spread evenly over [0, num_timesteps - 1], both ends included."""
    return sorted({round(i * (num_timesteps - 1) / max(count - 1, 1)) for i in range(count)})


def noised(pipe: Pipeline, x0: Tensor, t: int, eps: Tensor) -> Tensor:
    """x_t = alpha_t x0 + sigma_t eps under the pipeline's schedule, for one timestep t."""
    alpha, sigma = pipe.schedule.alpha_sigma(torch.full((len(x0),), t, device=x0.device), x0)
    return alpha.to(x0.dtype) * x0 + sigma.to(x0.dtype) * eps


def network_input(pipe: Pipeline, x_t: Tensor, t: int) -> Tensor:
    """What the network is given for x_t at timestep t: x_t, or its preconditioned scaling (EDM's c_in x)."""
    alpha, sigma = pipe.schedule.alpha_sigma(torch.full((len(x_t),), t, device=x_t.device), x_t)
    return pipe.prediction.scale_input(x_t, alpha.to(x_t.dtype), sigma.to(x_t.dtype))


def fixed_noise(shape: Sequence[int], seed: int, device: torch.device | str) -> Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(device)


def diffusion_space(pipe: Pipeline, batch: dict) -> Tensor:
    """The batch's images (in [-1, 1], as the datamodule gives them) in the pipeline's diffusion space."""
    with torch.no_grad():
        return pipe.encode(batch["image"].to(pipe.device).float())


def real_batch(source, n: int = 16, seed: int = 0, split: str = "val", trust: Sequence[str] = ()) -> dict:
    """n items of a run's data, collated as training batches are (``image`` in [-1, 1], ``label``, ``caption``).
    ``source``: a run config (``module.run_config``), its data config, or a train.py checkpoint's path; stored
    configs are built as files are (``registry.build``: difflab's datasets, or ``trust``)."""
    from omegaconf import OmegaConf
    from torch.utils.data import default_collate

    from difflab.data.draw import draw, size
    from difflab.data.layout import resolve_folder_config
    from difflab.loading import read_checkpoint, run_config_of
    from difflab.registry import DATA, build

    if isinstance(source, str) or hasattr(source, "is_file"):
        source = run_config_of(read_checkpoint(source, trust))
    config = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(source)))
    config = config.data if "data" in config else config
    resolve_folder_config(config)
    datamodule = build(OmegaConf.to_container(config), DATA, trust, "the run config", "data")
    dataset = datamodule.val_set if split == "val" and size(datamodule.val_set) != 0 else datamodule.train_set
    return default_collate(draw(dataset, n, seed))
