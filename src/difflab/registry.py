"""What a stored description may name, and the builder that builds nothing else: the reader of files someone else
wrote (a checkpoint, an exported folder, a Hub repository) rebuilds their models and data with ``build``, never
with Hydra's ``instantiate``, which calls whatever a ``_target_`` names (``shutil.copyfile``, ``torch.load`` with
``weights_only=False``, ...).

``build`` checks the whole description first and refuses a target outside ``MODEL_PARTS`` / ``DATA`` with one
line naming its key, before anything is called. Classes of the user's own (``hydra.searchpath`` options naming
``mypkg.MyNet``) are built only when the caller, never the file, trusts them: ``trust=["mypkg."]``.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from difflab.errors import UsageError

_SAMPLERS = ("DDIMSampler", "DDPMSampler", "DPMSolverPlusPlus2MSampler", "DPMSolverPlusPlus2MSDESampler",
             "EulerSampler", "EulerAncestralSampler", "HeunSampler", "UniPCSampler")
# what a trained model is made of: difflab's own classes, and the third-party ones through difflab's wrappers
# (diffusers' UNets and VAEs by their config, transformers' text encoders by name or folder)
MODEL_PARTS = frozenset({
    "difflab.lightning.DiffusionModule", "difflab.lightning.LatentDiffusionModule",
    "difflab.lightning.AutoencoderModule", "difflab.lightning.NoisyClassifierModule",
    "difflab.nn.UNet", "difflab.nn.DiT", "difflab.nn.Autoencoder", "difflab.nn.PatchDiscriminator",
    "difflab.nn.diffusers_unet.DiffusersUNet.from_config", "difflab.nn.lora.LoRA",
    *(f"difflab.diffusion.NoiseSchedule.{name}" for name in ("linear", "scaled_linear", "cosine", "sigmoid", "edm",
                                                            "flow")),
    *(f"difflab.diffusion.{name}Prediction" for name in ("Epsilon", "Sample", "V", "EDM", "Flow")),
    "difflab.diffusion.UniformWeighting", "difflab.diffusion.MinSNRWeighting",
    "difflab.diffusion.UniformTimesteps", "difflab.diffusion.LogNormalTimesteps",
    "difflab.diffusion.LogitNormalTimesteps",
    *(f"difflab.diffusion.{name}Loss" for name in ("L2", "L1", "Huber", "PseudoHuber")),
    *(f"difflab.diffusion.samplers.{name}" for name in _SAMPLERS),
    "difflab.conditioning.NoConditioning", "difflab.conditioning.ClassConditioner",
    "difflab.conditioning.TextConditioner", "difflab.conditioning.MultiConditioner",
    "difflab.conditioning.minilm", "difflab.conditioning.clip", "difflab.conditioning.pretrained",
    "difflab.latent.first_stage.AutoencoderFirstStage.from_config",
    "difflab.latent.first_stage.DiffusersFirstStage.from_config",
})
# the data a run was trained on (evaluate.py's real images, the probes' batches)
DATA = frozenset({
    "difflab.data.ImageCaptionDataModule", "difflab.data.DreamBoothDataModule", "difflab.data.shards.WebDataModule",
    "difflab.data.mnist", "difflab.data.digits", "difflab.data.ImageFolder", "difflab.data.gmm.gmm",
    "difflab.data.hub.HubDataModule", "difflab.data.hub.HubImages",
})
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})

_trusted: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("trusted", default=())


class UntrustedTargetError(UsageError):
    """A stored description names a class or function that difflab does not build from files."""


def describe(factory: Callable[..., Any], recursive: bool = True, **kwargs: Any) -> dict[str, Any]:
    """The stored description that ``build`` turns back into ``factory(**kwargs)`` (what a model's ``spec()`` writes
    into a checkpoint); ``recursive=False``: the factory gets its dict arguments unbuilt."""
    node: dict[str, Any] = {"_target_": f"{factory.__module__}.{factory.__qualname__}"}
    if not recursive:
        node["_recursive_"] = False
    return {**node, **kwargs}


def target_of(node: Any) -> str | None:
    """The dotted name a description's node is built by (None for a plain value)."""
    return node.get("_target_") if isinstance(node, Mapping) else None  # a dict, or a DictConfig node


def targets(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every ``_target_`` in a description, however deep (lists included)."""
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{key}.{name}" if key else str(name)
            if name == "_target_":
                yield path, value
            else:
                yield from targets(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from targets(value, f"{key}[{i}]")


def as_trust(trust: str | Sequence[str] | None) -> tuple[str, ...]:
    """A ``trust`` argument (one prefix, a list of them, None) as a tuple of strings."""
    if trust is None:
        return ()
    return (trust,) if isinstance(trust, str) else tuple(str(entry) for entry in trust)


def trusted(target: str, trust: Sequence[str]) -> bool:
    """Whether the caller trusts ``target``: it is one of their entries, or starts with one ending in a dot."""
    return any(target == entry or (entry.endswith(".") and target.startswith(entry)) for entry in trust)


def check(node: Any, known: frozenset[str], trust: Sequence[str] = (), source: str = "the file",
          root: str = "") -> None:
    """Refuse a description naming anything outside ``known`` (and not trusted), before anything is built; keys are
    named from ``root`` (``model``: ``model.network._target_``)."""
    trust = as_trust(trust)
    for key, target in targets(node, root):
        if not isinstance(target, str) or not (target in known or trusted(target, trust)):
            prefix = target.rsplit(".", 1)[0] + "." if isinstance(target, str) and "." in target else str(target)
            raise UntrustedTargetError(
                f"{source}: {key} names {target!r}, which difflab does not build from a file (it could run any "
                f"code); if you trust its author, allow it: trust=['{prefix}'] (difflab.load(..., trust=[...]), "
                "sample.py / evaluate.py trust=[...])")
    for key, value in _hydra_keys(node, root):
        if value not in HYDRA_KEYS:
            raise UntrustedTargetError(f"{source}: {key} is not a key difflab reads")


def _hydra_keys(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{key}.{name}" if key else str(name)
            if isinstance(name, str) and name.startswith("_") and name.endswith("_"):
                yield path, name
            yield from _hydra_keys(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _hydra_keys(value, f"{key}[{i}]")


def build(node: Any, known: frozenset[str] = MODEL_PARTS, trust: Sequence[str] = (), source: str = "the file",
          root: str = ""):
    """The object a stored description (plain dicts and lists, Hydra's ``_target_`` / ``_partial_`` /
    ``_recursive_`` conventions) describes, checked first (``check``). Interpolations are not resolved: a
    ``${...}`` in a file is a string. Nested builds (``_recursive_: false`` factories) inherit ``trust``."""
    trust = (*_trusted.get(), *as_trust(trust))
    check(node, known, trust, source, root)
    token = _trusted.set(trust)
    try:
        return _construct(node)
    finally:
        _trusted.reset(token)


def _construct(node: Any) -> Any:
    # hand-written rather than hydra.utils.instantiate on a checked config: instantiate resolves interpolations
    # (oc.env, oc.decode) and would build whatever a later change lets through; this builds only checked nodes
    if isinstance(node, (list, tuple)):
        return [_construct(value) for value in node]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {key: _construct(value) for key, value in node.items()}
    from hydra.utils import get_object

    recursive = node.get("_recursive_", True)
    kwargs = {key: _construct(value) if recursive else value for key, value in node.items()
              if key not in HYDRA_KEYS}
    args = [_construct(value) if recursive else value for value in node.get("_args_", [])]
    target = get_object(node["_target_"])
    if node.get("_partial_"):
        return functools.partial(target, *args, **kwargs)
    return target(*args, **kwargs)
