"""Checkpoints back into models: ``difflab.load(path)`` gives the Pipeline of a train.py checkpoint, of a folder
written by ``python -m difflab.export`` or of a Hub repository holding one."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difflab import registry
from difflab.errors import MissingFileError, UsageError

if TYPE_CHECKING:
    from difflab.pipeline import Pipeline


def load_module(ckpt: str | Path, device: str | torch.device = "cpu", lora: str | Path | None = None,
                trust: Sequence[str] = ()):
    """Rebuild the trained LightningModule from the run config stored in a train.py checkpoint (or an exported
    folder, or ``hf://owner/name``), with its weights; ``lora``: a LoRA adapter file
    (``<run>/lora/adapter.safetensors``) put onto its EMA and raw networks. Only classes difflab knows are built
    (``registry``); ``trust``: prefixes of classes of your own the file may name too (``["mypkg."]``)."""
    module = _load_module(ckpt, registry.as_trust(trust))
    if lora is not None:
        from difflab.nn.lora import load_adapter

        if not hasattr(module, "ema"):
            raise UsageError(f"{ckpt} is a {type(module).__name__} checkpoint: LoRA adapters go onto diffusion models")
        for network in (module.ema, module.network):
            load_adapter(network, lora)
    return module.to(device).eval()


def _load_module(ckpt: str | Path, trust: tuple[str, ...]):
    path = locate(ckpt)
    if path.is_dir():
        return load_exported(path, trust)
    checkpoint = read_checkpoint(path, trust)
    module = model_from_config(checkpoint_model_config(checkpoint), trust, str(path))
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["difflab_config"]
    return module


# an exported folder (difflab.export): the model's config, and the weights its sub-models' folders do not hold
EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_VERSION = "difflab.json", "difflab.safetensors", 1
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells a repository
HUB_PREFIX = "hf://"
# a name ending so is a file of difflab's (a checkpoint, weights, a config), never a Hub repository
FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".bin", ".json", ".yaml")


def locate(source: str | Path) -> Path:
    """The local path of a model: ``hf://owner/name`` is downloaded from the Hub; a bare ``owner/name`` only when
    no local file could be meant (nothing at that path, no folder ``owner`` here, no file suffix such as
    ``.ckpt``); any other missing path is a ``MissingFileError`` naming it, and nothing touches the network."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        repo_id = text.removeprefix(HUB_PREFIX)
        if not HUB_ID.fullmatch(repo_id):
            raise UsageError(f"{text} is not a Hub repository: write hf://owner/name")
        return download(repo_id)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if (isinstance(source, str) and HUB_ID.fullmatch(text) and not Path(text.split("/")[0]).exists()
            and not text.lower().endswith(FILE_SUFFIXES)):
        return download(text)
    hint = f" (a Hub repository: hf://{text})" if HUB_ID.fullmatch(text) else " (train first: python train.py)"
    raise MissingFileError(f"checkpoint not found: {path}{hint}")


def download(repo_id: str) -> Path:
    """A Hub repository's files, through the local cache (``huggingface_hub.snapshot_download``)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # offline, no such repository, no access: one line
        raise MissingFileError(f"{repo_id} is neither a local path nor a Hub repository that could be downloaded "
                               f"({type(err).__name__}: {one_line(err)})") from err


def read_checkpoint(path: str | Path, trust: Sequence[str] = (), what: str = "checkpoint") -> dict:
    """A train.py checkpoint as a dict of tensors and plain values (``torch.load(weights_only=True)``), its stored
    run config checked: every class it names is one difflab builds from files (or trusted), so no reader of it
    can be led to build anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
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
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise UsageError(f"{path} has no difflab run config: was it written by difflab's train.py?")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise UsageError(f"{path} has no weights (state_dict): was it written by difflab's train.py?")
    built = {k: v for k, v in checkpoint_model_config(checkpoint).items() if k not in TRAINING_ONLY}
    registry.check(built, registry.MODEL_PARTS, trust, str(path), "model")
    registry.check(run_config.get("data"), registry.DATA, trust, str(path), "data")
    registry.check(run_config.get("sampler"), registry.MODEL_PARTS, trust, str(path), "sampler")
    return checkpoint


def checkpoint_model_config(checkpoint: dict) -> dict:
    """The model config a checkpoint is rebuilt from: the run's ``model`` node, with the architectures the
    checkpoint stores in place of the files or Hub ids its network and first stage came from."""
    model_config = dict(checkpoint["difflab_config"]["model"])
    if "difflab_network" in checkpoint:  # a network from outside files (network=diffusers_unet): its architecture
        model_config["network"] = checkpoint["difflab_network"]
    if "difflab_first_stage" in checkpoint:  # latent diffusion: the first stage's architecture, weights below
        model_config["first_stage"] = checkpoint["difflab_first_stage"]
    return model_config


def ema_network_weights(path: str | Path, trust: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The EMA network's weights of a train.py checkpoint (where fine-tuning starts), by the network's own names."""
    state = read_checkpoint(path, trust, "finetune.base checkpoint")["state_dict"]
    weights = {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}
    if not weights:
        raise UsageError(f"{path} holds no EMA network weights: use a checkpoint of python train.py")
    return weights


def autoencoder_of(path: str | Path, trust: Sequence[str] = ()) -> tuple[dict, dict[str, torch.Tensor], float]:
    """(the autoencoder's config node, its weights, the latent scale its training estimated) of a
    ``python train.py model=autoencoder`` checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"first-stage checkpoint not found: {path} (train the autoencoder first: python "
                                "train.py model=autoencoder, then first_stage.ckpt=<run>/checkpoints/last.ckpt)")
    checkpoint = read_checkpoint(path, trust, "first-stage checkpoint")
    model_config = checkpoint["difflab_config"]["model"]
    if model_config.get("_target_") != "difflab.lightning.AutoencoderModule":
        raise UsageError(f"{path} is not an autoencoder checkpoint (its model is "
                         f"{model_config.get('_target_', 'unknown')}); train one with: python train.py "
                         "model=autoencoder")
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("autoencoder."): v for k, v in state.items() if k.startswith("autoencoder.")}
    return model_config["autoencoder"], weights, float(state["latent_scale"])


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
    return {k: v for name in files for k, v in load_file(str(inside(folder, name, folder))).items()}


def inside(folder: Path, relative: str, root: Path) -> Path:
    """``folder / relative``, refused unless it lies inside ``root`` (an exported folder points only into itself)."""
    if not isinstance(relative, str):
        raise UsageError(f"{root}: {relative!r} is not a path inside the folder")
    path = (folder / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise UsageError(f"{root}: {relative!r} points outside the exported folder; its files must lie inside it")
    return path


# the config keys an exported folder may give as paths relative to itself (difflab.export writes these)
RELATIVE_PATHS = frozenset({"conditioner.encoder.name_or_path", "conditioner.parts.text.encoder.name_or_path"})


def load_exported(folder: Path, trust: tuple[str, ...] = ()):
    """The LightningModule of an exported folder: built from its ``difflab.json``, the weights of each sub-model
    from its folder (``unet/``, ``vae/``, ...) and the rest from ``difflab.safetensors``. The exported network is
    both the EMA and the raw network. Every file it names lies inside it."""
    from safetensors.torch import load_file

    config_file = folder / EXPORT_CONFIG
    if not config_file.is_file():
        hint = (" it is a diffusers pipeline: load it with diffusers, or fine-tune its UNet with network="
                "diffusers_unet network.pretrained=DIR network.subfolder=unet"
                if (folder / "model_index.json").is_file() else " give a checkpoint (.ckpt) or an exported folder")
        raise UsageError(f"{folder} is a folder without {EXPORT_CONFIG}:{hint}")
    try:
        info = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{config_file} is not valid JSON ({one_line(err)}): export the model again") from err
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise UsageError(f"{config_file} holds no model config: export the model again")
    if info.get("version", 0) > EXPORT_VERSION:
        raise UsageError(f"{folder} was exported by a newer difflab (layout {info['version']}): upgrade difflab")
    model_config = json.loads(json.dumps(info["model"]))  # a copy, changed below
    for key in info.get("relative_paths", []):  # files inside the folder (a text encoder), wherever it now is
        if key not in RELATIVE_PATHS:
            raise UsageError(f"{config_file}: relative_paths names {key!r}, which is not a path difflab exports")
        node, _, leaf = _parent(model_config, key)
        if node is not None and leaf in node:
            node[leaf] = str(inside(folder, node[leaf], folder))
            node["local_files_only"] = True
    _refuse_outside_paths(model_config, folder)
    module = model_from_config(model_config, trust, str(folder))
    rest = folder / EXPORT_WEIGHTS
    state = load_file(str(rest)) if rest.is_file() else {}
    components = info.get("components", {})
    if not isinstance(components, dict):
        raise UsageError(f"{config_file}: components is not a mapping of weights to sub-folders")
    for path, subfolder in components.items():
        weights = read_weights(inside(folder, subfolder, folder))
        owners = [path] if path.split(".")[0] != "network" else [path, "ema" + path.removeprefix("network")]
        state.update({f"{owner}.{k}": v for owner in owners for k, v in weights.items()})
    module.load_state_dict(state)
    module.run_config = info.get("run_config") or {"model": info["model"]}
    return module


def _parent(config: dict, key: str) -> tuple[dict | None, str, str]:
    """(the dict holding ``key``'s last part, the key, that part) of a dotted key; None where the path is absent."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), key, leaf


def _refuse_outside_paths(config, folder: Path, key: str = "") -> None:
    """Every ``name_or_path`` of an exported model (a text encoder) is a file inside the folder, never a Hub id or a
    path elsewhere on this machine."""
    if isinstance(config, dict):
        for name, value in config.items():
            path = f"{key}.{name}" if key else name
            if name == "name_or_path" and value is not None:
                inside(folder, value, folder)
                if not Path(value).is_absolute():
                    raise UsageError(f"{folder}: {path} = {value!r} is not a file of the exported folder")
            else:
                _refuse_outside_paths(value, folder, path)
    elif isinstance(config, list):
        for value in config:
            _refuse_outside_paths(value, folder, key)


# what only training builds: left out when a stored model is rebuilt
TRAINING_ONLY = ("optimizer", "lr_scheduler")


def model_from_config(model_config: dict, trust: Sequence[str] = (), source: str = "the file"):
    """The LightningModule of a stored model config (a checkpoint's or an export's), built by ``registry.build``:
    only difflab's classes (and ``trust``ed ones). What only training uses is left out: the optimizer and LR
    schedule, the LoRA base run, the latent cache folder."""
    model_config = dict(model_config)
    if isinstance(model_config.get("sampler"), dict):
        model_config["sampler"] = upgrade_sampler_config(dict(model_config["sampler"]))
    for key in TRAINING_ONLY:
        if key in model_config:
            model_config[key] = None
    if model_config.get("finetune"):  # LoRA: the checkpoint holds the weights; its base run need not exist now
        model_config["finetune"] = {**model_config["finetune"], "base": None, "trust": []}
    if "latent_cache_dir" in model_config:
        model_config["latent_cache_dir"] = None
    return registry.build(model_config, registry.MODEL_PARTS, trust, source, "model")


def build_sampler(node: dict, trust: Sequence[str] = (), source: str = "the file"):
    """A stored sampler node (a checkpoint's ``sampler``) as a sampler: difflab's samplers only."""
    return registry.build(upgrade_sampler_config(dict(node)), registry.MODEL_PARTS, trust, source, "sampler")


def one_line(err: BaseException) -> str:
    """The first line of an error's message (torch's can run to a page)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def upgrade_sampler_config(node):
    """A sampler node of a checkpoint from before samplers took no schedule (``_partial_``), in place; returned."""
    if node.get("_partial_"):
        node.pop("_partial_")
        node["_target_"] = node["_target_"].replace("difflab.diffusion.", "difflab.diffusion.samplers.", 1)
    return node


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA, else MPS, else CPU; any other name as torch spells it."""
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def load(ckpt: str | Path, device: str | torch.device = "auto", use_ema: bool = True,
         lora: str | Path | None = None, trust: Sequence[str] = ()) -> Pipeline:
    """The Pipeline of a train.py checkpoint, an exported folder or a Hub repository holding one (``hf://owner/name``):
    EMA weights by default, on ``device`` (auto: CUDA, MPS or CPU); ``lora``: a LoRA adapter file put onto the
    network. The file's classes must be difflab's own unless ``trust`` names them (``["mypkg."]``)."""
    module = load_module(ckpt, resolve_device(device), lora, trust)
    if not hasattr(module, "pipeline"):
        raise UsageError(f"{ckpt} is a {type(module).__name__} checkpoint, not a diffusion model: nothing to sample")
    return module.pipeline(use_ema=use_ema)
