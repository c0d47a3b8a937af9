"""The one reader of models, and the layout of what train.py writes: ``difflab.load(path)`` gives the Pipeline of a
train.py checkpoint, of a folder written by ``python -m difflab.export`` or of a Hub repository holding one
(``hf://owner/name``); ``load_model`` the ``DiffusionModel`` itself, ``load_module`` a checkpoint's LightningModule.

Every file is someone else's: stored configs are rebuilt by ``registry.build`` (difflab's classes only, unless the
caller trusts more), weights are read with ``torch.load(weights_only=True)`` or safetensors, an exported folder
points only into itself, and the Hub is reached only when asked. No other module knows the checkpoint's keys
(``difflab_config``, ``difflab_network``, the ``model.`` / ``ema.`` / ``autoencoder.`` prefixes of its weights).
"""

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
    from torch import nn

    from difflab.model import DiffusionModel
    from difflab.pipeline import Pipeline

# ---- what train.py writes into a checkpoint (besides Lightning's own keys) ----------------------------------------
RUN_CONFIG = "difflab_config"  # the composed run config (plain containers)
NETWORK_SPEC = "difflab_network"  # a network built from outside files (network=diffusers_unet): its architecture
FIRST_STAGE_SPEC = "difflab_first_stage"  # latent diffusion: the first stage's architecture (its weights are below)
LAYOUT = "difflab_layout"  # 2: a DiffusionModule's weights under model. and ema.; absent: 1, the parts at the top
DIFFUSION_MODULES = {"difflab.lightning.DiffusionModule", "difflab.lightning.LatentDiffusionModule"}
CLASSIFIER_MODULE = "difflab.lightning.NoisyClassifierModule"
AUTOENCODER_MODULE = "difflab.lightning.AutoencoderModule"
MODEL_PARTS = ("network", "schedule", "prediction", "sampler", "conditioner", "first_stage")


def store_run_config(checkpoint: dict, run_config: dict | None) -> None:
    """Keep the run config in a checkpoint (the LightningModules' ``on_save_checkpoint``)."""
    if run_config is not None:
        checkpoint[RUN_CONFIG] = run_config


def store_architectures(checkpoint: dict, model: DiffusionModel) -> None:
    """Keep what rebuilds the model without its original files: the architectures of a network from a pretrained
    folder and of the first stage, and the layout of the weights."""
    checkpoint[LAYOUT] = 2
    spec = getattr(model.network, "spec", None)
    if callable(spec):
        checkpoint[NETWORK_SPEC] = spec()
    if model.first_stage is not None:
        checkpoint[FIRST_STAGE_SPEC] = model.first_stage.spec()


def upgrade_checkpoint(checkpoint: dict) -> None:
    """A DiffusionModule checkpoint of an earlier layout in today's, in place (for resuming and for reading)."""
    if "state_dict" not in checkpoint:  # trainer=fsdp: the strategy loaded the weights itself (all of layout 2)
        return
    checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
    checkpoint[LAYOUT] = 2


def upgrade_state_dict(state: dict) -> dict:
    """Layout 1 (the module held network / conditioner / first_stage) -> 2 (they live in its ``model``)."""
    if any(key.startswith("model.") for key in state):
        return state
    moved = ("network.", "conditioner.", "first_stage.")
    return {("model." + key if key.startswith(moved) else key): value for key, value in state.items()}


def model_weights(state: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """A DiffusionModule's weights as its ``DiffusionModel``'s, with the EMA network (or the raw one)."""
    state = upgrade_state_dict(state)
    network = "ema." if use_ema else "model.network."
    out = {key.removeprefix("model."): value for key, value in state.items()
           if key.startswith("model.") and not key.startswith("model.network.")}
    out.update({"network." + key.removeprefix(network): value for key, value in state.items()
                if key.startswith(network)})
    return out


# ---- reading ------------------------------------------------------------------------------------------------------

def load_model(source: str | Path, device: str | torch.device = "cpu", *, use_ema: bool = True,
               lora: str | Path | None = None, trust: Sequence[str] = ()) -> DiffusionModel:
    """The ``DiffusionModel`` of a train.py checkpoint, an exported folder or a Hub repository, with its EMA weights
    (``use_ema=False``: the raw ones; an export holds one set), in eval mode on ``device``; ``lora``: a LoRA adapter
    file (``<run>/lora/adapter.safetensors``) put onto the network. Only classes difflab knows are built
    (``registry``); ``trust``: prefixes of classes of your own the file may name too (``["mypkg."]``)."""
    trust = registry.as_trust(trust)
    path = locate(source)
    if path.is_dir():
        config, weights, run_config = read_exported(path, trust)
    else:
        checkpoint = read_checkpoint(path, trust)
        config, run_config = checkpoint_model_config(checkpoint), checkpoint[RUN_CONFIG]
        weights = model_weights(checkpoint["state_dict"], use_ema)
    model = diffusion_model_from_config(config, trust, str(path), run_config, weights)
    _load_weights(model, weights, path)
    if lora is not None:
        from difflab.nn.lora import load_adapter

        load_adapter(model.network, lora)
    return model.to(device).eval()


def load_module(ckpt: str | Path, device: str | torch.device = "cpu", trust: Sequence[str] = ()):
    """The LightningModule of a train.py checkpoint (its training state: both networks of a diffusion model, an
    autoencoder, a classifier), rebuilt as ``load_model`` builds models; in eval mode on ``device``."""
    trust = registry.as_trust(trust)
    path = locate(ckpt)
    if path.is_dir():
        raise UsageError(f"{path} is an exported folder: it holds the model, not a training state; load it with "
                         "difflab.load (or difflab.loading.load_model)")
    checkpoint = read_checkpoint(path, trust)
    config = checkpoint_model_config(checkpoint)
    module = model_from_config(config, trust, str(path))
    if config.get("_target_") in DIFFUSION_MODULES:
        upgrade_checkpoint(checkpoint)
    _load_weights(module, checkpoint["state_dict"], path)
    module.run_config = checkpoint[RUN_CONFIG]
    return module.to(device).eval()


def _load_weights(module: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict``, its page-long mismatch report as one line naming the file."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:2])[:300]
        raise UsageError(f"{path}: its weights do not fit the model its config describes (a damaged or edited "
                         f"file?): {detail or one_line(err)}") from err


def load_classifier_network(path: str | Path, trust: Sequence[str] = (),
                            what: str = "noisy classifier") -> tuple[nn.Module, list[str] | None]:
    """(the network, the class names or None) of a ``python train.py model=classifier`` checkpoint: a noisy
    classifier ``network(x_t, t) -> logits``, in eval mode; ``what`` the caller wants it as, for the refusal."""
    checkpoint = read_checkpoint(path, trust, "classifier checkpoint")
    config = checkpoint[RUN_CONFIG]["model"]
    if config.get("_target_") != CLASSIFIER_MODULE:
        clean = " model.clean=true data=..." if what == "classifier" else ""
        raise UsageError(f"{path} is a {_short(config.get('_target_'))} checkpoint, not a {what} (train one: "
                         f"python train.py model=classifier{clean})")
    network = registry.build(config["network"], registry.MODEL_PARTS, trust, str(path), "model.network")
    network.load_state_dict({k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()
                             if k.startswith("network.")})
    return network.eval(), (checkpoint[RUN_CONFIG].get("data") or {}).get("class_names")


def _short(target) -> str:
    return str(target).rsplit(".", 1)[-1] if target else "unknown"


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
    if path.is_dir() and any(path.glob("*.distcp")):
        raise UsageError(f"{path} is a sharded checkpoint (trainer=fsdp with sharded_checkpoints=true), which only "
                         "resumes training (its index is a pickle): trainer.strategy.sharded_checkpoints=false writes "
                         "the single files that sampling, evaluation and export read")
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
    """A train.py checkpoint as a dict of tensors and plain values (``torch.load(weights_only=True)``), the model
    and sampler of its run config checked: every class they name is one difflab builds from files (or trusted).
    Its data config is checked where it is built (evaluate.py's real images, the probes' batches), so a model of
    data of the user's own samples without ``trust``."""
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
    run_config = checkpoint.get(RUN_CONFIG)
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise UsageError(f"{path} has no difflab run config: was it written by difflab's train.py?")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise UsageError(f"{path} has no weights (state_dict): was it written by difflab's train.py?")
    built = {k: v for k, v in checkpoint_model_config(checkpoint).items() if k not in TRAINING_ONLY}
    registry.check(built, registry.MODEL_PARTS, trust, str(path), "model")
    registry.check(run_config.get("sampler"), registry.MODEL_PARTS, trust, str(path), "sampler")
    return checkpoint


def run_config_of(checkpoint: dict) -> dict:
    """The run config a checkpoint read by ``read_checkpoint`` was trained with."""
    return checkpoint[RUN_CONFIG]


def checkpoint_model_config(checkpoint: dict) -> dict:
    """The model config a checkpoint is rebuilt from: the run's ``model`` node, with the architectures the
    checkpoint stores in place of the files or Hub ids its network and first stage came from."""
    model_config = dict(checkpoint[RUN_CONFIG]["model"])
    if NETWORK_SPEC in checkpoint:  # a network from outside files (network=diffusers_unet): its architecture
        model_config["network"] = checkpoint[NETWORK_SPEC]
    if FIRST_STAGE_SPEC in checkpoint:  # latent diffusion: the first stage's architecture, weights below
        model_config["first_stage"] = checkpoint[FIRST_STAGE_SPEC]
    return model_config


def ema_network_weights(path: str | Path, trust: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The EMA network's weights of a train.py checkpoint (where fine-tuning starts), by the network's own names."""
    state = upgrade_state_dict(read_checkpoint(path, trust, "finetune.base checkpoint")["state_dict"])
    weights = {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}
    if not weights:
        raise UsageError(f"{path} holds no EMA network weights: use a checkpoint of python train.py")
    return weights


def ema_shapes(checkpoint: dict) -> dict[str, tuple[int, ...]]:
    """The EMA network's parameter and buffer shapes of a ``read_checkpoint`` checkpoint, by the network's names."""
    return {key.removeprefix("ema."): tuple(value.shape)
            for key, value in upgrade_state_dict(checkpoint["state_dict"]).items() if key.startswith("ema.")}


def replace_ema_weights(checkpoint: dict, weights: dict[str, torch.Tensor], source: str, path: Path) -> None:
    """A checkpoint of ``read_checkpoint`` with its EMA network's weights (by the network's names) replaced in
    place, each cast to the stored dtype; names and shapes must be the stored ones."""
    state = upgrade_state_dict(checkpoint["state_dict"])
    stored = {key.removeprefix("ema."): key for key in state if key.startswith("ema.")}
    if set(stored) != set(weights):
        missing, extra = sorted(set(stored) - set(weights)), sorted(set(weights) - set(stored))
        raise UsageError(f"{source} does not fit {path}'s EMA network (missing {missing[:3]}, unknown {extra[:3]}): "
                         "give the run's own checkpoint")
    for name, key in stored.items():
        if tuple(state[key].shape) != tuple(weights[name].shape):
            raise UsageError(f"{name}: shape {tuple(weights[name].shape)} in {source}, {tuple(state[key].shape)} "
                             f"in {path}")
        state[key] = weights[name].to(state[key].dtype)
    checkpoint["state_dict"] = state


def autoencoder_of(path: str | Path, trust: Sequence[str] = ()) -> tuple[dict, dict[str, torch.Tensor], float]:
    """(the autoencoder's config node, its weights, the latent scale its training estimated) of a
    ``python train.py model=autoencoder`` checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"first-stage checkpoint not found: {path} (train the autoencoder first: python "
                                "train.py model=autoencoder, then first_stage.ckpt=<run>/checkpoints/last.ckpt)")
    checkpoint = read_checkpoint(path, trust, "first-stage checkpoint")
    model_config = checkpoint[RUN_CONFIG]["model"]
    if model_config.get("_target_") != AUTOENCODER_MODULE:
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


# ---- writing an exported folder (python -m difflab.export) ----------------------------------------------------

def model_config(model: DiffusionModel) -> dict:
    """The model's config as ``difflab.load`` rebuilds it from the folder alone: architectures instead of the
    files or Hub ids the weights came from, and no fine-tuning (adapters are merged)."""
    config = dict(model.run_config["model"])
    spec = getattr(model.network, "spec", None)
    if callable(spec):
        config["network"] = spec()
    if model.first_stage is not None:
        config["first_stage"] = model.first_stage.spec()
    config["finetune"] = None
    return config


def text_encoder_from_folder(config: dict) -> list[str]:
    """Point the model config's text encoder at the folder's ``text_encoder/`` and ``tokenizer/`` (a diffusers
    text-to-image folder holds them); returns the config keys that are paths relative to the folder."""
    encoder = (config.get("conditioner") or {}).get("encoder") or {}
    if "name_or_path" not in encoder:  # minilm: shipped in its package
        return []
    encoder.update(name_or_path=".", subfolder="text_encoder", tokenizer_subfolder="tokenizer", local_files_only=True)
    return ["conditioner.encoder.name_or_path"]


def write_exported(model: DiffusionModel, components: dict[str, str], folder: Path, format: str,
                   source: str | Path) -> None:
    """The files ``read_exported`` reads beside the sub-models' folders (``components``: {model path: sub-folder},
    written by the export): ``difflab.json`` and ``difflab.safetensors`` (the weights no sub-folder holds)."""
    from safetensors.torch import save_file

    held = ("network.", *(f"{path}." for path in components))
    rest = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(held)}
    if rest:
        save_file(rest, str(folder / EXPORT_WEIGHTS))
    run_config = {**model.run_config, "model": model_config(model)}
    relative = text_encoder_from_folder(run_config["model"]) if (folder / "text_encoder").is_dir() else []
    info = {"version": EXPORT_VERSION, "format": format, "components": components, "relative_paths": relative,
            "source": str(source), "model": run_config["model"], "run_config": run_config}
    (folder / EXPORT_CONFIG).write_text(json.dumps(info, indent=2))


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


def read_exported(folder: Path, trust: tuple[str, ...] = ()) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(the model config, the ``DiffusionModel``'s weights, the run config) of an exported folder: its
    ``difflab.json``, the weights of each sub-model from its folder (``unet/``, ``vae/``, ...) and the rest from
    ``difflab.safetensors``. Every file it names lies inside it."""
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
        node, leaf = _parent(model_config, key)
        if node is not None and leaf in node:
            node[leaf] = str(inside(folder, node[leaf], folder))
            node["local_files_only"] = True
    _refuse_outside_paths(model_config, folder)
    registry.check({k: v for k, v in model_config.items() if k not in TRAINING_ONLY}, registry.MODEL_PARTS, trust,
                   str(folder), "model")
    rest = folder / EXPORT_WEIGHTS
    weights = {k: v for k, v in (load_file(str(rest)) if rest.is_file() else {}).items() if k != "ema_updates"}
    components = info.get("components", {})
    if not isinstance(components, dict):
        raise UsageError(f"{config_file}: components is not a mapping of weights to sub-folders")
    for path, subfolder in components.items():
        weights.update({f"{path}.{k}": v for k, v in read_weights(inside(folder, subfolder, folder)).items()})
    return model_config, weights, info.get("run_config") or {"model": info["model"]}


def _parent(config: dict, key: str) -> tuple[dict | None, str]:
    """(the dict holding a dotted key's last part, that part); None where the path is absent."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


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
    """The LightningModule of a stored model config, built by ``registry.build``: only difflab's classes (and
    ``trust``ed ones). What only training uses is left out: the optimizer and LR schedule, the LoRA base run, the
    latent cache folder."""
    return registry.build(_without_training(model_config), registry.MODEL_PARTS, trust, source, "model")


def _without_training(model_config: dict) -> dict:
    """A stored model config without what rebuilding it must not build or read: the optimizer and LR schedule, the
    LoRA base run, the latent cache folder; its sampler node upgraded."""
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
    return model_config


def diffusion_model_from_config(model_config: dict, trust: Sequence[str] = (), source: str = "the file",
                                run_config: dict | None = None,
                                weights: dict[str, torch.Tensor] | None = None) -> DiffusionModel:
    """The ``DiffusionModel`` of a stored DiffusionModule config, its parts built by ``registry.build``: the
    network (with its LoRA adapters, whose weights the file holds), schedule, prediction, sampler, conditioner
    and first stage; nothing of training. With the file's ``weights``, a network or first stage whose config asks
    for more parameters than the file holds is refused before it is allocated."""
    from difflab.model import DiffusionModel

    target = model_config.get("_target_")
    if target not in DIFFUSION_MODULES:
        raise UsageError(f"{source} is a {_short(target)} checkpoint, not a diffusion model: nothing to sample")
    config = _without_training(model_config)
    registry.check({k: config.get(k) for k in (*MODEL_PARTS, "finetune")}, registry.MODEL_PARTS, trust, source,
                   "model")
    if weights is not None:
        for key in ("network", "first_stage"):
            if config.get(key) is not None:
                stored = sum(v.numel() for k, v in weights.items() if k.startswith(f"{key}."))
                _refuse_larger_than_stored(config[key], stored, trust, source, f"model.{key}")
    parts = {key: registry.build(config[key], registry.MODEL_PARTS, trust, source, f"model.{key}")
             for key in MODEL_PARTS if config.get(key) is not None}
    if config.get("finetune"):
        registry.build(config["finetune"], registry.MODEL_PARTS, trust, source, "model.finetune").apply(
            parts["network"])
    return DiffusionModel(parts["network"], parts["schedule"], parts["prediction"], parts["sampler"],
                          parts.get("conditioner"), guidance_scale=config.get("guidance_scale", 1.0),
                          image_shape=config.get("image_shape") or (1, 32, 32), first_stage=parts.get("first_stage"),
                          image_size=config.get("image_size"), run_config=run_config)


def _refuse_larger_than_stored(node: dict, stored: int, trust: Sequence[str], source: str, key: str) -> None:
    """Build ``node`` on the meta device (no memory) and refuse it if its weights outnumber the ``stored`` values:
    a config edited to ask for a huge network would otherwise be allocated before its weights fail to load. A part
    that cannot be built on the meta device is left to the real build (and to ``load_state_dict``)."""
    try:
        with torch.device("meta"):
            probe = registry.build(node, registry.MODEL_PARTS, trust, source, key)
        wanted = sum(v.numel() for v in probe.state_dict().values())
    except Exception:  # noqa: BLE001 (a factory that reads files or tables on the CPU: measured by loading it)
        return
    if wanted > stored:
        raise UsageError(f"{source}: {key} asks for {wanted:,} weights but the file holds {stored:,}: its config "
                         "does not describe its weights (a damaged or edited file)")


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
    return load_model(ckpt, resolve_device(device), use_ema=use_ema, lora=lora, trust=trust).pipeline()
