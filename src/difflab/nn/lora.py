"""Low-rank adapters (Hu et al. 2021) on a denoising network through peft: ``finetune=lora`` trains only them.

The base weights are frozen; the adapters (rank r, scale alpha / r, B zero-initialised so training starts from
the base model) sit on the attention projections by default, on the ResBlocks' convolutions with ``convs``.
They are saved alone as a small safetensors file, loaded onto the base again, or merged into it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from difflab.errors import UsageError
from difflab.extras import require
from difflab.files import atomic_write
from difflab.nn.attention import Attention, SelfAttentionBlock
from difflab.nn.unet import ResBlock

# the projections of an attention layer, by its class: ours, and diffusers' (to_out.0 is its output linear)
ATTENTION_PROJECTIONS = {Attention: ("to_q", "to_kv", "to_out"), SelfAttentionBlock: ("qkv", "proj")}
DIFFUSERS_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _peft():
    return require("peft", "lora", "finetune=lora")


def default_targets(network: nn.Module, convs: bool = False) -> list[str]:
    """Full names of the layers that get adapters: every attention projection (q, k, v, out), plus with ``convs``
    the ResBlocks' two 3x3 convolutions (diffusers' ResnetBlock2D: conv1, conv2)."""
    targets = []
    for name, module in network.named_modules():
        prefix = f"{name}." if name else ""
        projections = ATTENTION_PROJECTIONS.get(type(module))
        if projections is None and type(module).__name__ == "Attention" and hasattr(module, "to_k"):
            projections = DIFFUSERS_PROJECTIONS
        if projections:
            targets += [prefix + p for p in projections]
        if convs and (isinstance(module, ResBlock) or type(module).__name__ == "ResnetBlock2D"):
            targets += [prefix + "conv1", prefix + "conv2"]
    return targets


class LoRA:
    """What ``finetune=lora`` configures: ``apply(network)`` injects the adapters and freezes the rest."""

    def __init__(self, rank: int = 4, alpha: float | None = None, target_modules: Sequence[str] | None = None,
                 convs: bool = False, dropout: float = 0.0, base: str | None = None, trust: Sequence[str] = ()):
        if rank < 1:
            raise UsageError(f"finetune.rank must be >= 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.target_modules = list(target_modules) if target_modules else None
        self.convs, self.dropout = convs, float(dropout)
        self.base = base  # a train.py checkpoint whose EMA weights the network starts from (DiffusionModule loads it)
        self.trust = tuple(trust)  # classes of the user's own that ``base`` may name

    def config(self, network: nn.Module):
        targets = self.target_modules or default_targets(network, self.convs)
        if not targets:
            raise UsageError(f"finetune=lora found no attention layers in {type(network).__name__}: name them with "
                             "finetune.target_modules=[...] (module names), or set finetune.convs=true")
        # full names are matched exactly (peft matches a plain string as a suffix of each module's name)
        pattern = "^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$"
        return _peft().LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=pattern,
                                  lora_dropout=self.dropout)

    def apply(self, network: nn.Module) -> nn.Module:
        """Inject the adapters into ``network`` (in place) and freeze everything else; returns it."""
        for module in network.modules():  # the channels-first attention reads qkv's weight itself, past any adapter
            if isinstance(module, SelfAttentionBlock):
                module.implementation = "sdpa"
        _peft().inject_adapter_in_model(self.config(network), network)
        for name, p in network.named_parameters():
            p.requires_grad_("lora_" in name)
        return network

    def spec(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": self.target_modules, "convs": self.convs}


def load_base(network: nn.Module, ckpt: str | Path, trust: Sequence[str] = ()) -> nn.Module:
    """Load the EMA weights of a train.py checkpoint into ``network`` (in place): where fine-tuning starts."""
    from difflab.loading import ema_network_weights

    path = Path(ckpt).expanduser()
    weights = ema_network_weights(path, trust)
    try:
        network.load_state_dict(weights)
    except RuntimeError as err:
        raise UsageError(f"{path} was trained with another network than this run's: give the base run's network "
                         f"options ({str(err).splitlines()[0]})") from err
    return network


def adapter_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone (peft's names, without the adapter name)."""
    return _peft().get_peft_model_state_dict(network)


def save_adapter(network: nn.Module, lora: LoRA, path: str | Path) -> Path:
    """The adapters as a safetensors file, with the LoRA settings in its metadata; written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(network).items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"difflab_lora": json.dumps(lora.spec())})
    return path


def load_adapter(network: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapters saved by ``save_adapter`` into a base ``network`` (in place) and load their weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"LoRA adapter not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # a checkpoint or any other file: safetensors' header error, in one line
        raise UsageError(f"{path} is not a difflab LoRA adapter (not a safetensors file: {err}); give a finetune=lora "
                         "run's lora/adapter.safetensors") from err
    if "difflab_lora" not in metadata:
        raise UsageError(f"{path} is not a difflab LoRA adapter (no difflab_lora metadata)")
    LoRA(**json.loads(metadata["difflab_lora"])).apply(network)
    result = _peft().set_peft_model_state_dict(network, load_file(str(path)))
    if result.unexpected_keys:
        raise UsageError(f"{path} does not fit this network: {len(result.unexpected_keys)} adapter weights have no "
                         f"layer, e.g. {result.unexpected_keys[0]}")
    return network


def merge(network: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back (in place): the network as it
    computes, without peft's wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in network.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, child, module.get_base_layer())
    return network
