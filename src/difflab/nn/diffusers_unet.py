"""diffusers' UNets behind difflab's network interface: ``network=diffusers_unet`` trains a ``UNet2DModel`` or
``UNet2DConditionModel``, built from a config or loaded from published weights, with difflab's schedules,
samplers, guidance, EMA and callbacks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from difflab.errors import UsageError
from difflab.extras import require
from difflab.registry import describe

KINDS = {"unet2d": "UNet2DModel", "unet2d_condition": "UNet2DConditionModel"}
# what a model built from scratch starts from (network.config overrides it): small, for 32x32 MNIST on a CPU
SMALL = {
    "unet2d": dict(block_out_channels=[32, 64, 64], layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                   down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    "unet2d_condition": dict(block_out_channels=[32, 64, 64], layers_per_block=1, attention_head_dim=4,
                             norm_num_groups=8, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
}


def _diffusers():
    return require("diffusers", "diffusers", "network=diffusers_unet")


def _plain(value: Any) -> Any:
    """A config value as plain Python (OmegaConf containers and tuples become dicts and lists)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


class DiffusersUNet(nn.Module):
    """forward(x, t, *, class_labels, context, context_mask, cond) as difflab's UNet, mapped onto diffusers':
    class_labels -> class_labels (a table of num_classes + 1 rows, the last the null class), context / context_mask
    -> encoder_hidden_states / encoder_attention_mask, cond (pooled text) -> timestep_cond (added to the time
    embedding through ``time_cond_proj_dim``)."""

    def __init__(self, model: nn.Module, num_classes: int | None = None):
        super().__init__()
        self.model = model
        config = model.config
        self.kind = next(kind for kind, name in KINDS.items() if type(model).__name__ == name)
        self.in_channels, self.out_channels = config.in_channels, config.out_channels
        self.num_classes = num_classes
        self.context_dim = config.cross_attention_dim if self.kind == "unet2d_condition" else None
        self.cond_dim = getattr(config, "time_cond_proj_dim", None)

    @classmethod
    def from_config(cls, kind: str, config: dict, num_classes: int | None = None) -> DiffusersUNet:
        """The architecture alone (weights follow from a state dict): what checkpoints store, see ``spec``."""
        model_class = getattr(_diffusers(), KINDS[kind])
        return cls(model_class.from_config(_plain(config)), num_classes)

    def spec(self) -> dict[str, Any]:
        """How to rebuild this network without the pretrained folder or the Hub: its class and full config."""
        config = {k: _plain(v) for k, v in dict(self.model.config).items()}
        return describe(DiffusersUNet.from_config, recursive=False, kind=self.kind, config=config,
                        num_classes=self.num_classes)

    def forward(self, x: Tensor, t: Tensor, *, class_labels: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        kwargs: dict[str, Any] = {}
        if self.num_classes is not None:
            if class_labels is None:  # unconditional: the null class
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            kwargs["class_labels"] = class_labels
        if self.kind == "unet2d_condition":
            if context is None:
                raise UsageError("a UNet2DConditionModel needs context tokens: use conditioning=text or class_text")
            kwargs.update(encoder_hidden_states=context.to(x.dtype),
                          encoder_attention_mask=None if context_mask is None else context_mask.to(x.dtype))
            if self.cond_dim is not None and cond is not None:
                kwargs["timestep_cond"] = cond.to(x.dtype)
        t = t.to(x.dtype) if t.is_floating_point() else t
        return self.model(x, t, **kwargs).sample


def diffusers_unet(pretrained: str | None = None, subfolder: str | None = None, revision: str | None = None,
                   local_files_only: bool = False, kind: str | None = None, config: dict | None = None,
                   sample_size: int | None = None, in_channels: int | None = None, num_classes: int | None = None,
                   context_dim: int | None = None, cond_dim: int | None = None) -> DiffusersUNet:
    """A diffusers UNet from ``pretrained`` (a hub id or a ``save_pretrained`` folder; ``subfolder="unet"`` in a
    pipeline repo), or built from scratch: ``kind`` (unet2d | unet2d_condition; default the latter when the run
    uses text) from a small default architecture updated by ``config`` (the class's keyword arguments).

    The run's conditioning is added where the model lacks it, zero-initialised so a pretrained model starts as it
    was published: a class table (``num_class_embeds`` = num_classes + 1) and a pooled-text projection into the
    time embedding (``time_cond_proj_dim``). What cannot be added (another channel count, another text width)
    fails naming the fix."""
    diffusers = _diffusers()
    config = _plain(config) or {}
    if pretrained is not None and config:
        raise UsageError("network.config builds a UNet from scratch; with network.pretrained leave it empty "
                         f"(it has {sorted(config)})")
    if pretrained is not None:
        try:
            base = diffusers.UNet2DModel.load_config(pretrained, subfolder=subfolder, revision=revision,
                                                     local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            raise UsageError(f"could not read a diffusers UNet config from {pretrained!r}"
                             f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {err}") from err
        found = next((k for k, name in KINDS.items() if name == base.get("_class_name")), None)
        if found is None:
            raise UsageError(f"{pretrained!r} holds a {base.get('_class_name')}, not a UNet2DModel or "
                             "UNet2DConditionModel")
        kind = found
    else:
        kind = kind or ("unet2d_condition" if context_dim is not None else "unet2d")
        if kind not in KINDS:
            raise UsageError(f"unknown network.kind {kind!r}; valid: {', '.join(KINDS)}")
        base = {**SMALL[kind], **({"sample_size": sample_size} if sample_size else {}), **config}
    overrides = _conditioning_overrides(kind, base, in_channels, num_classes, context_dim, cond_dim, pretrained)
    model_class = getattr(diffusers, KINDS[kind])
    if pretrained is not None:
        model = model_class.from_pretrained(pretrained, subfolder=subfolder, revision=revision,
                                            local_files_only=local_files_only, low_cpu_mem_usage=False, **overrides)
        _zero_added(model, overrides)
    else:
        model = model_class(**{k: v for k, v in {**base, **overrides}.items() if not k.startswith("_")})
    return DiffusersUNet(model, num_classes)


def _conditioning_overrides(kind, base, in_channels, num_classes, context_dim, cond_dim, pretrained) -> dict:
    source = f"the pretrained UNet {pretrained!r}" if pretrained else "network.config"
    overrides = {}
    if in_channels is not None and base.get("in_channels", in_channels) != in_channels:
        raise UsageError(f"{source} takes {base['in_channels']} channels, the data has {in_channels}: use data with "
                         f"{base['in_channels']} channels (data.channels={base['in_channels']})")
    if in_channels is not None and pretrained is None:
        overrides["in_channels"] = in_channels
        overrides.setdefault("out_channels", base.get("out_channels") or in_channels)
    if num_classes is not None:
        have = base.get("num_class_embeds")
        if have is None:
            overrides["num_class_embeds"] = num_classes + 1
        elif have != num_classes + 1:
            raise UsageError(f"{source} has {have} class embeddings; conditioning=class needs num_classes + 1 = "
                             f"{num_classes + 1} (the last is the null class)")
    if kind == "unet2d" and context_dim is not None:
        raise UsageError("conditioning=text needs cross-attention: a UNet2DConditionModel (network.kind="
                         "unet2d_condition), not a UNet2DModel")
    if kind == "unet2d_condition":
        width = base.get("cross_attention_dim")
        if pretrained is None and context_dim is not None:
            overrides["cross_attention_dim"] = context_dim
        elif context_dim is not None and width != context_dim:
            raise UsageError(f"{source} attends to {width}-d text states, text_encoder gives {context_dim}-d: pick "
                             f"a text_encoder of width {width} (Stable Diffusion 1.x: text_encoder=clip)")
        if cond_dim is not None:
            have = base.get("time_cond_proj_dim")
            if have is None:
                overrides["time_cond_proj_dim"] = cond_dim
            elif have != cond_dim:
                raise UsageError(f"{source} projects a {have}-d timestep_cond, the pooled text is {cond_dim}-d: "
                                 "set conditioning.pooled=false")
    return overrides


@torch.no_grad()
def _zero_added(model: nn.Module, overrides: dict) -> None:
    """Zero the layers added to a pretrained model for the run's conditioning: it starts as it was published."""
    if "num_class_embeds" in overrides:
        model.class_embedding.weight.zero_()
    if "time_cond_proj_dim" in overrides:
        model.time_embedding.cond_proj.weight.zero_()
