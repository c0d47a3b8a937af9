"""Trained models out of difflab: a folder that ``difflab.load``, diffusers and the Hugging Face Hub read.

    python -m difflab.export ckpt=outputs/.../last.ckpt out=DIR [format=diffusers|safetensors] [push_to_hub=REPO]
    difflab.export.export("outputs/.../last.ckpt", "DIR")            # the same from Python

Every export holds ``difflab.json`` (the model's config: network, schedule, prediction, sampler, conditioning,
guidance), the network in ``unet/`` (``transformer/`` for a DiT: difflab's networks as ``PyTorchModelHubMixin``
writes them, diffusers' UNets as diffusers does), a diffusers VAE in ``vae/`` and any other weights in
``difflab.safetensors``. ``format=diffusers`` lays it out as a diffusers pipeline besides (``model_index.json``,
``scheduler/`` reproducing the run's sampler), so ``DiffusionPipeline.from_pretrained(DIR)`` loads it too. The
weights are the EMA ones (``use_ema=False``: the raw ones), with LoRA adapters merged in.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from difflab.errors import UsageError
from difflab.loading import load_model, write_exported
from difflab.model import DiffusionModel

FORMATS = ("diffusers", "safetensors")

__all__ = ["FORMATS", "export", "push"]


def export(ckpt: str | Path, out: str | Path, format: str | None = None, push_to_hub: str | None = None, *,
           use_ema: bool = True, private: bool | None = None, overwrite: bool = False,
           trust: Sequence[str] = ()) -> Path:
    """Export the train.py checkpoint ``ckpt`` to the folder ``out`` (see the module's doc) and, with
    ``push_to_hub=REPO``, upload it. ``format``: diffusers | safetensors; None: diffusers where the run is a
    diffusers pipeline, else safetensors. The folder is written beside ``out`` and renamed into place, so a failed
    export leaves nothing half-written; an existing non-empty ``out`` is refused unless ``overwrite``."""
    from difflab.export import diffusers_format
    from difflab.nn.lora import merge

    out = Path(out).expanduser()
    if format not in (None, *FORMATS):
        raise UsageError(f"unknown format={format!r}; valid: {', '.join(FORMATS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"out={out} exists and is not an empty folder: choose another out= (or overwrite=true)")
    model = load_model(ckpt, "cpu", use_ema=use_ema, trust=trust)
    if (model.run_config.get("model") or {}).get("finetune"):
        merge(model.network)  # LoRA: the adapters folded into the weights they adapt
    reason = diffusers_format.unsupported(model)
    format = format or ("diffusers" if reason is None else "safetensors")
    if format == "diffusers" and reason is not None:
        raise UsageError(f"format=diffusers: {reason}; format=safetensors exports it for difflab.load")

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        if format == "diffusers":
            components = diffusers_format.save_pipeline(model, partial)
        else:
            components = save_components(model, partial)
        write_exported(model, components, partial, format, ckpt)
        if not (partial / "README.md").exists():
            (partial / "README.md").write_text(model_card(model, format))
        readable_as_umask_allows(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"exported {ckpt} to {out} (format={format})")
    if push_to_hub:
        print(f"pushed to {push(out, push_to_hub, private=private)}")
    return out


def readable_as_umask_allows(folder: Path) -> None:
    """safetensors writes its files readable by their owner alone; an export is for sharing: files get the
    permissions any new file gets (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def network_folder(network: nn.Module) -> str:
    """The sub-folder of the network, named as diffusers names it: ``transformer`` for a DiT, else ``unet``."""
    return "transformer" if type(network).__name__ == "DiT" else "unet"


def save_components(model: DiffusionModel, folder: Path) -> dict[str, str]:
    """Save the network and a diffusers first stage in their own folders; returns {model path: sub-folder}."""
    from safetensors.torch import save_file

    network = model.network
    name = network_folder(network)
    if type(network).__name__ == "DiffusersUNet":
        network.model.save_pretrained(folder / name)
        components = {"network.model": name}
    elif callable(getattr(network, "save_pretrained", None)):  # UNet, DiT: PyTorchModelHubMixin
        network.save_pretrained(folder / name)
        components = {"network": name}
    else:  # a network of the user's own: its weights alone
        (folder / name).mkdir()
        weights = {k: v.contiguous() for k, v in network.state_dict().items()}
        save_file(weights, str(folder / name / "model.safetensors"))
        components = {"network": name}
    vae = getattr(model.first_stage, "vae", None)
    if vae is not None:  # a diffusers AutoencoderKL, its config carrying the latent scaling the model was trained with
        vae.register_to_config(scaling_factor=model.first_stage.scale_factor,
                               shift_factor=model.first_stage.shift_factor or None)
        vae.save_pretrained(folder / "vae")
        components["first_stage.vae"] = "vae"
    return components


def model_card(model: DiffusionModel, format: str) -> str:
    """A Hub model card: what the model is and how to sample it."""
    from difflab.conditioning.base import NoConditioning

    conditional = not isinstance(model.conditioner, NoConditioning)
    text = type(model.conditioner).__name__ == "TextConditioner"
    tag = "text-to-image" if text else "unconditional-image-generation"
    library = "diffusers" if format == "diffusers" else "difflab"
    ask = 'prompt="..."' if text else "label=0" if conditional else ""
    usage = (f"import difflab\n\npipe = difflab.load(\"REPO_OR_FOLDER\")\n"
             f"images = pipe(n=16, {ask + ', ' if ask else ''}seed=0)  # (16, C, H, W) in [0, 1]\n")
    if format == "diffusers":
        usage += ("\n# or with diffusers\nfrom diffusers import DiffusionPipeline\n\n"
                  "pipe = DiffusionPipeline.from_pretrained(\"REPO_OR_FOLDER\")\n")
    return (f"---\nlibrary_name: {library}\npipeline_tag: {tag}\ntags:\n- difflab\n- diffusion\n---\n\n"
            f"# A diffusion model trained with difflab\n\nExported by `python -m difflab.export`. Sample it:\n\n"
            f"```python\n{usage}```\n\n`difflab.json` holds the training config (schedule, prediction, sampler, "
            "conditioning, guidance).\n")


def push(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Upload an exported folder to the Hub repository ``repo_id`` (created if missing); returns the commit's URL.
    The folder stays as it is whatever happens."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return str(api.upload_folder(repo_id=repo, folder_path=str(folder),
                                     commit_message=f"Upload {Path(folder).name} (exported by difflab)"))
    except Exception as err:  # offline, no token, no access: one line; the export is on disk
        from difflab.loading import one_line

        raise UsageError(f"could not push {folder} to {repo_id} ({type(err).__name__}: {one_line(err)}); the "
                         "export is kept: log in (hf auth login, or set HF_TOKEN) and upload it with "
                         f"hf upload {repo_id} {folder}") from err
