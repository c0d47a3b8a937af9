"""Checkpoints back into models: ``difflab.load(path)`` gives the Pipeline of a train.py checkpoint, of a folder
written by ``python -m difflab.export`` or of a Hub repository holding one."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from difflab.errors import MissingFileError, UsageError
from difflab.pipeline import Pipeline


def load_module(ckpt: str | Path, device: str | torch.device = "cpu", lora: str | Path | None = None):
    """Rebuild the trained LightningModule from the run config stored in a train.py checkpoint (or an exported
    folder), with its weights; ``lora``: a LoRA adapter file (``<run>/lora/adapter.safetensors``) put onto its EMA
    and raw networks."""
    module = _load_module(ckpt)
    if lora is not None:
        from difflab.nn.lora import load_adapter

        if not hasattr(module, "ema"):
            raise UsageError(f"{ckpt} is a {type(module).__name__} checkpoint: LoRA adapters go onto diffusion models")
        for network in (module.ema, module.network):
            load_adapter(network, lora)
    return module.to(device).eval()


def _load_module(ckpt: str | Path):
    from omegaconf import OmegaConf

    path = Path(ckpt).expanduser()
    if not path.exists() and HUB_ID.fullmatch(str(ckpt)):
        path = download(str(ckpt))
    if path.is_dir():
        return load_exported(path)
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
    module = instantiate_model(model_config)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = run_config
    return module


# an exported folder (difflab.export): the model's config, and the weights its sub-models' folders do not hold
EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_VERSION = "difflab.json", "difflab.safetensors", 1
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells a repository


def download(repo_id: str) -> Path:
    """A Hub repository's files, through the local cache (``huggingface_hub.snapshot_download``)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # offline, no such repository, no access: one line
        raise MissingFileError(f"{repo_id} is neither a local path nor a Hub repository that could be downloaded "
                               f"({type(err).__name__}: {one_line(err)})") from err


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` folder: its safetensors file, or every shard of its index."""
    from safetensors.torch import load_file

    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
    else:
        files = [name for name in ("model.safetensors", "diffusion_pytorch_model.safetensors")
                 if (folder / name).is_file()]
    if not files:
        raise MissingFileError(f"no weights in {folder}: an exported folder is incomplete (export it again)")
    return {k: v for name in files for k, v in load_file(str(folder / name)).items()}


def load_exported(folder: Path):
    """The LightningModule of an exported folder: built from its ``difflab.json``, the weights of each sub-model
    from its folder (``unet/``, ``vae/``, ...) and the rest from ``difflab.safetensors``. The exported network is
    both the EMA and the raw network."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    config_file = folder / EXPORT_CONFIG
    if not config_file.is_file():
        hint = (" it is a diffusers pipeline: load it with diffusers, or fine-tune its UNet with network="
                "diffusers_unet network.pretrained=DIR network.subfolder=unet"
                if (folder / "model_index.json").is_file() else " give a checkpoint (.ckpt) or an exported folder")
        raise UsageError(f"{folder} is a folder without {EXPORT_CONFIG}:{hint}")
    info = json.loads(config_file.read_text())
    if info.get("version", 0) > EXPORT_VERSION:
        raise UsageError(f"{folder} was exported by a newer difflab (layout {info['version']}): upgrade difflab")
    model_config = OmegaConf.create(info["model"])
    for key in info.get("relative_paths", []):  # files inside the folder (a text encoder), wherever it now is
        OmegaConf.update(model_config, key, str(folder / OmegaConf.select(model_config, key)))
    module = instantiate_model(model_config)
    rest = folder / EXPORT_WEIGHTS
    state = load_file(str(rest)) if rest.is_file() else {}
    for path, subfolder in info["components"].items():
        weights = read_weights(folder / subfolder)
        owners = [path] if path.split(".")[0] != "network" else [path, "ema" + path.removeprefix("network")]
        state.update({f"{owner}.{k}": v for owner in owners for k, v in weights.items()})
    module.load_state_dict(state)
    module.run_config = info["run_config"]
    return module


def instantiate_model(model_config):
    """The LightningModule of a stored model config (a checkpoint's or an export's), its sampler node upgraded."""
    from hydra.utils import instantiate

    if model_config.get("sampler") is not None:
        upgrade_sampler_config(model_config.sampler)
    return instantiate(model_config, _convert_="all")


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


def load(ckpt: str | Path, device: str | torch.device = "auto", use_ema: bool = True,
         lora: str | Path | None = None) -> Pipeline:
    """The Pipeline of a train.py checkpoint, an exported folder or a Hub repository holding one: EMA weights by
    default, on ``device`` (auto: CUDA, MPS or CPU); ``lora``: a LoRA adapter file put onto the network."""
    module = load_module(ckpt, resolve_device(device), lora)
    if not hasattr(module, "pipeline"):
        raise UsageError(f"{ckpt} is a {type(module).__name__} checkpoint, not a diffusion model: nothing to sample")
    return module.pipeline(use_ema=use_ema)
