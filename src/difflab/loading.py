"""Checkpoints back into models: ``difflab.load(path)`` gives the Pipeline of a train.py checkpoint."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from difflab.errors import MissingFileError, UsageError
from difflab.pipeline import Pipeline


def load_module(ckpt: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the trained LightningModule from the run config stored in a train.py checkpoint, with its weights."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path} (train first: python train.py)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage gives a KeyError, a truncated file a RuntimeError, ...
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            raise UsageError(f"{path} holds pickled Python objects, which are not loaded (unpickling them could run "
                             "any code): use a checkpoint written by difflab's train.py") from err
        raise UsageError(f"{path} is not a readable checkpoint: corrupt, truncated or not a torch file "
                         f"({type(err).__name__}: {one_line(err)})") from err
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path} is not a train.py checkpoint (it holds a {type(checkpoint).__name__})")
    run_config = checkpoint.get("difflab_config")
    if run_config is None:
        raise UsageError(f"{path} has no difflab run config: was it written by difflab's train.py?")
    model_config = OmegaConf.create(run_config)["model"]
    if "difflab_network" in checkpoint:  # a network from outside files (network=diffusers_unet): its architecture
        model_config.network = OmegaConf.create(checkpoint["difflab_network"])
    if "difflab_first_stage" in checkpoint:  # latent diffusion: the first stage's architecture, weights below
        model_config.first_stage = OmegaConf.create(checkpoint["difflab_first_stage"])
    if model_config.get("finetune"):  # LoRA: the checkpoint holds the weights; its base run need not exist now
        model_config.finetune.base = None
    if model_config.get("sampler") is not None:
        upgrade_sampler_config(model_config.sampler)
    module = instantiate(model_config, _convert_="all")
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = run_config
    return module.to(device).eval()


def one_line(err: BaseException) -> str:
    """The first line of an error's message (torch's can run to a page)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def upgrade_sampler_config(node) -> None:
    """A sampler node of a checkpoint from before samplers took no schedule (``_partial_``), in place."""
    if node.get("_partial_"):
        node.pop("_partial_")
        node._target_ = node._target_.replace("difflab.diffusion.", "difflab.diffusion.samplers.", 1)


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA, else MPS, else CPU; any other name as torch spells it."""
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def load(ckpt: str | Path, device: str | torch.device = "auto", use_ema: bool = True) -> Pipeline:
    """The Pipeline of a train.py checkpoint: EMA weights by default, on ``device`` (auto: CUDA, MPS or CPU)."""
    module = load_module(ckpt, resolve_device(device))
    if not hasattr(module, "pipeline"):
        raise UsageError(f"{ckpt} is a {type(module).__name__} checkpoint, not a diffusion model: nothing to sample")
    return module.pipeline(use_ema=use_ema)
