"""``python sample.py ckpt=PATH n=64 sampler=ddim steps=50 seed=0 out=DIR``: samples from a checkpoint.

Conditional models: ``prompt="a handwritten 7"`` (or a list, or ``prompts_file=PATH`` with one prompt per line)
or ``label=7`` (or a list), with ``guidance_scale=`` and ``guidance_rescale=``; n samples per prompt / label,
the same initial noise for each, one PNG per sample named by prompt (or label) and seed, and a grid with one
row per prompt.

Editing (pixel and latent models): ``init_image=PATH strength=0.6`` is image-to-image (SDEdit); with
``mask=PATH`` (white: regenerate) inpainting (RePaint, ``resample=`` repeats per step); ``invert=PATH``
inverts an image with DDIM (under ``source_prompt=`` / ``source_label=``) and regenerates it under each
``prompt=`` / ``label=``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from difflab.cli.errors import hydra_main
from difflab.conditioning.base import NoConditioning
from difflab.data.images import load_image, load_mask
from difflab.errors import MissingFileError, UsageError
from difflab.loading import build_sampler, load_module, resolve_device
from difflab.pipeline import Pipeline


def checkpoint_sampler(cfg: DictConfig, module):
    """(sampler, its config): ``cfg.sampler`` if chosen, else the one the checkpoint was trained with (built as
    the file's other parts are: difflab's samplers only), with ``cfg.steps`` steps if given."""
    steps = {"num_steps": cfg.steps} if cfg.get("steps") is not None else {}
    if cfg.get("sampler") is not None:  # the user's own config: Hydra's instantiate
        sampler_cfg = OmegaConf.merge(cfg.sampler, steps)
        return instantiate(sampler_cfg), sampler_cfg
    sampler_cfg = {**module.run_config["sampler"], **steps}
    return build_sampler(sampler_cfg, cfg.get("trust"), str(cfg.ckpt)), OmegaConf.create(sampler_cfg)


def requests(cfg: DictConfig) -> list[tuple[str, dict]]:
    """[(file-name stem, the pipeline's label= / prompt=)] for each prompt / label asked for; [("", {})] for none."""
    prompts = cfg.get("prompt")
    if cfg.get("prompts_file"):
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise MissingFileError(f"prompts_file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    labels = cfg.get("label")
    if prompts is not None and labels is not None:
        raise UsageError("give prompt= (or prompts_file=) or label=, not both")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise UsageError(f"prompts must be strings, got {prompt!r}")
        return [(slug(p), {"prompt": p}) for p in prompts]
    if labels is not None:  # class indices (label=7) or, for image-folder models, class names (label=circle)
        labels = [labels] if isinstance(labels, (int, str)) else list(labels)
        return [(slug(k) if isinstance(k, str) else f"label{k}", {"label": k}) for k in labels]
    return [("", {})]


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe form of a prompt: lowercase words joined by '_' ("empty" for the empty prompt)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "empty"


def sample(cfg: DictConfig) -> Path:
    device = resolve_device(cfg.device)
    module = load_module(cfg.ckpt, device, cfg.get("lora"), cfg.get("trust"))
    pipe = module.pipeline(use_ema=cfg.use_ema)
    sampler, sampler_cfg = checkpoint_sampler(cfg, module)
    asked = requests(cfg)
    unconditional_model = isinstance(pipe.conditioner, NoConditioning)
    if asked != [("", {})] and unconditional_model and not cfg.get("classifier_ckpt"):
        raise UsageError(f"{cfg.ckpt} is an unconditional model: drop prompt= / label= (or guide it with a noisy "
                         "classifier: classifier_ckpt=PATH label=K)")
    if cfg.get("unconditional") and asked != [("", {})]:
        raise UsageError("unconditional=true samples the null condition: drop prompt= / label=")
    guidance = pipe.guidance_scale if cfg.get("guidance_scale") is None else cfg.guidance_scale
    classifier = None
    if cfg.get("classifier_ckpt"):
        from difflab.lightning.classifier_module import NoisyClassifierModule

        if not any("label" in r for _, r in asked):
            raise UsageError("classifier guidance needs the classes to guide toward: label=K (or a list)")
        classifier_module = load_module(cfg.classifier_ckpt, device, trust=cfg.get("trust"))
        if not isinstance(classifier_module, NoisyClassifierModule):
            raise UsageError(f"{cfg.classifier_ckpt} is not a noisy classifier (train one: python train.py "
                             "model=classifier)")
        classifier = classifier_module.network
    editing = editing_inputs(cfg, pipe)
    grid_name = f"_{sampler.sigma_schedule}" if sampler.sigma_schedule else ""  # heun_karras_12steps_seed0
    # a checkpoint's samples go to its run directory; an exported folder's (or Hub repository's) to ./generated/NAME
    ckpt = Path(cfg.ckpt)
    generated = ckpt.resolve().parent.parent / "generated" if ckpt.is_file() else Path("generated") / ckpt.name
    out = Path(cfg.out) if cfg.out else generated / f"{sampler.name}{grid_name}_{sampler.num_steps}steps_seed{cfg.seed}"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("invert"):
        return invert_and_regenerate(cfg, pipe, sampler, asked, guidance, out)
    rows = []
    for stem, request in asked:  # seeds seed, seed + 1, ...: the same noise for every prompt
        images = pipe(cfg.n, **request, unconditional=bool(cfg.get("unconditional")), guidance_scale=guidance,
                      guidance_rescale=cfg.guidance_rescale, sampler=sampler, seed=cfg.seed, classifier=classifier,
                      classifier_scale=cfg.classifier_scale, batch_size=cfg.batch_size, progress=cfg.progress,
                      **editing).float().cpu()
        names = [f"{stem}_{i:03d}_seed{cfg.seed + i}.png" if stem else f"{i:04d}_seed{cfg.seed + i}.png"
                 for i in range(len(images))]
        Pipeline.save(images, out, names)
        rows.append(images)
    written = cfg.n * len(rows)
    nrow = cfg.n if len(rows) > 1 or editing else math.ceil(math.sqrt(cfg.n))
    if editing:  # a first row with the input (and the masked input, the region to regenerate in grey)
        init = editing["init_image"].cpu()
        shown = [init] + ([init * (1 - editing["mask"].cpu()) + 0.5 * editing["mask"].cpu()] if "mask" in editing
                          else [])
        nrow = max(nrow, len(shown))
        rows.insert(0, padded_row([x[0] for x in shown], nrow))
    save_image(make_grid(torch.cat(rows), nrow=nrow, padding=2, pad_value=1.0), out / "grid.png")
    settings = {"ckpt": str(cfg.ckpt), "n": cfg.n, "seed": cfg.seed, "use_ema": cfg.use_ema,
                "sampler": OmegaConf.to_container(sampler_cfg), "device": str(device),
                "prompts": [r["prompt"] for _, r in asked if "prompt" in r] or None,
                "labels": [r["label"] for _, r in asked if "label" in r] or None,
                "unconditional": bool(cfg.get("unconditional")),
                "guidance_scale": guidance, "guidance_rescale": cfg.guidance_rescale,
                "classifier_ckpt": cfg.get("classifier_ckpt"), "classifier_scale": cfg.get("classifier_scale"),
                "init_image": cfg.get("init_image"), "mask": cfg.get("mask"),
                "strength": editing.get("strength"), "resample": editing.get("resample")}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {written} samples and grid.png to {out}")
    return out


def editing_inputs(cfg: DictConfig, pipe: Pipeline) -> dict:
    """The pipeline's editing arguments from ``init_image=``, ``strength=``, ``mask=``, ``resample=``."""
    if cfg.get("mask") and not cfg.get("init_image"):
        raise UsageError("mask= needs the image to inpaint: init_image=PATH")
    if cfg.get("invert") and cfg.get("init_image"):
        raise UsageError("give invert=PATH (DDIM inversion) or init_image=PATH (image-to-image / inpainting), not both")
    if not cfg.get("init_image"):
        return {}
    channels, size = pipe.pixel_shape[0], pipe.pixel_shape[-1]
    editing = {"init_image": (load_image(cfg.init_image, channels, size) + 1) / 2}
    if cfg.get("mask"):
        editing["mask"] = load_mask(cfg.mask, size)
        editing["resample"] = int(cfg.get("resample", 1))
    default_strength = 1.0 if "mask" in editing else 0.8  # diffusers' inpainting / image-to-image defaults
    editing["strength"] = default_strength if cfg.get("strength") is None else float(cfg.strength)
    return editing


def invert_and_regenerate(cfg: DictConfig, pipe: Pipeline, sampler, asked: list[tuple[str, dict]],
                          guidance: float, out: Path) -> Path:
    """DDIM-invert ``cfg.invert`` under the source prompt / label, then regenerate it under each asked one
    (the source itself when none is asked: a reconstruction)."""
    channels, size = pipe.pixel_shape[0], pipe.pixel_shape[-1]
    image = (load_image(cfg.invert, channels, size) + 1) / 2
    source = {}
    if cfg.get("source_prompt") is not None:
        source["prompt"] = str(cfg.source_prompt)
    if cfg.get("source_label") is not None:
        source["label"] = cfg.source_label
    conditional = not isinstance(pipe.conditioner, NoConditioning)
    x_T = pipe.invert(image, **(source if conditional else {}), sampler=sampler, progress=cfg.progress)
    edits = []
    for stem, request in (asked if asked != [("", {})] else [("reconstruction", source)]):
        scale = 1.0 if stem == "reconstruction" else guidance
        edited = pipe(noise=x_T, **(request if conditional else {}), unconditional=conditional and not request,
                      sampler=sampler, guidance_scale=scale, progress=cfg.progress).float().cpu()
        save_image(edited, out / f"inverted_{stem or 'unconditional'}.png")
        edits.append(edited)
    grid = torch.cat([image, *edits])
    save_image(make_grid(grid, nrow=grid.shape[0], padding=2, pad_value=1.0), out / "grid.png")
    settings = {"ckpt": str(cfg.ckpt), "invert": str(cfg.invert), "source": source or None,
                "targets": [r for _, r in asked if r] or None, "guidance_scale": guidance,
                "sampler": repr(sampler), "use_ema": cfg.use_ema}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote the input and {len(edits)} regenerations to {out}")
    return out


def padded_row(images: list[torch.Tensor], length: int) -> torch.Tensor:
    """``images`` followed by white tiles up to ``length``: a grid row of its own."""
    blank = torch.ones_like(images[0])
    return torch.stack(images + [blank] * (length - len(images)))


@hydra_main("sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
