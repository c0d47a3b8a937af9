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

from difflab import all_ranks, launch
from difflab.cli.errors import hydra_main
from difflab.conditioning.base import NoConditioning
from difflab.diffusion.samplers import Sampler
from difflab.errors import MissingFileError, UsageError
from difflab.loading import load_classifier_network, load_model
from difflab.model import DiffusionModel
from difflab.pipeline import Pipeline


def chosen_sampler(cfg: DictConfig, model: DiffusionModel) -> tuple[Sampler, dict]:
    """(sampler, its config for settings.json): ``cfg.sampler`` if chosen (the user's own config), else the one the
    model was trained with, with ``cfg.steps`` steps if given."""
    steps = {"num_steps": cfg.steps} if cfg.get("steps") is not None else {}
    if cfg.get("sampler") is not None:
        sampler_cfg = OmegaConf.merge(cfg.sampler, steps)
        return instantiate(sampler_cfg), OmegaConf.to_container(sampler_cfg)
    stored = (model.run_config or {}).get("model", {}).get("sampler") or {}
    return model.pipeline().resolve_sampler(None, cfg.get("steps")), {**stored, **steps}


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
    if cfg.get("invert") and int(cfg.devices) * int(cfg.num_nodes) > 1:
        raise UsageError("invert= regenerates one image: drop devices= / num_nodes= (it runs in one process)")
    device = launch.start(cfg.device, cfg.devices, cfg.num_nodes)
    all_ranks.check_enough(cfg.n)
    model = load_model(cfg.ckpt, device, use_ema=cfg.use_ema, lora=cfg.get("lora"), trust=cfg.get("trust"))
    pipe = model.pipeline()
    sampler, sampler_cfg = chosen_sampler(cfg, model)
    asked = requests(cfg)
    classifier = None
    if cfg.get("classifier_ckpt"):
        classifier, _ = load_classifier_network(cfg.classifier_ckpt, cfg.get("trust"))
        classifier = classifier.to(device)
    grid_name = f"_{sampler.sigma_schedule}" if sampler.sigma_schedule else ""  # heun_karras_12steps_seed0
    # a checkpoint's samples go to its run directory; an exported folder's (or Hub repository's) to ./generated/NAME
    ckpt = Path(cfg.ckpt)
    generated = ckpt.resolve().parent.parent / "generated" if ckpt.is_file() else Path("generated") / ckpt.name
    out = Path(cfg.out) if cfg.out else generated / f"{sampler.name}{grid_name}_{sampler.num_steps}steps_seed{cfg.seed}"
    if cfg.get("invert"):
        if cfg.get("init_image"):
            raise UsageError("give invert=PATH (DDIM inversion) or init_image=PATH (image-to-image / inpainting), "
                             "not both")
        return invert_and_regenerate(cfg, pipe, sampler, asked, out)
    editing = {key: cfg.get(key) for key in ("init_image", "mask", "strength") if cfg.get(key) is not None}
    if cfg.get("mask"):
        editing["resample"] = int(cfg.get("resample", 1))
    rows, part, first = [], all_ranks.share(cfg.n), all_ranks.rank() == 0
    for stem, request in asked:  # seeds seed, seed + 1, ...: the same noise for every prompt
        images = pipe(cfg.n, **request, unconditional=bool(cfg.get("unconditional")),
                      guidance_scale=cfg.get("guidance_scale"), guidance_rescale=cfg.guidance_rescale,
                      sampler=sampler, seed=cfg.seed, classifier=classifier, classifier_scale=cfg.classifier_scale,
                      batch_size=cfg.batch_size, progress=cfg.progress and first, part=part, **editing).float().cpu()
        names = [f"{stem}_{i:03d}_seed{cfg.seed + i}.png" if stem else f"{i:04d}_seed{cfg.seed + i}.png"
                 for i in part]  # each process writes its own samples
        Pipeline.save(images, out, names)
        rows.append(all_ranks.gather(images))
    if not first:  # one process draws the grid and writes the settings
        return out
    written = cfg.n * len(rows)
    nrow = cfg.n if len(rows) > 1 or editing else math.ceil(math.sqrt(cfg.n))
    if editing:  # a first row with the input (and the masked input, the region to regenerate in grey)
        init = pipe.read_images(cfg.init_image).cpu()
        shown = [init]
        if cfg.get("mask"):
            mask = pipe.read_images(cfg.mask, mask=True).cpu()
            shown.append(init * (1 - mask) + 0.5 * mask)
        nrow = max(nrow, len(shown))
        rows.insert(0, padded_row([x[0] for x in shown], nrow))
    save_image(make_grid(torch.cat(rows), nrow=nrow, padding=2, pad_value=1.0), out / "grid.png")
    settings = {"ckpt": str(cfg.ckpt), "n": cfg.n, "seed": cfg.seed, "use_ema": cfg.use_ema,
                "sampler": sampler_cfg, "device": str(device), "processes": all_ranks.world_size(),
                "prompts": [r["prompt"] for _, r in asked if "prompt" in r] or None,
                "labels": [r["label"] for _, r in asked if "label" in r] or None,
                "unconditional": bool(cfg.get("unconditional")),
                "guidance_scale": pipe.resolve_guidance(cfg.get("guidance_scale")),
                "guidance_rescale": cfg.guidance_rescale,
                "classifier_ckpt": cfg.get("classifier_ckpt"), "classifier_scale": cfg.get("classifier_scale"),
                "init_image": cfg.get("init_image"), "mask": cfg.get("mask"),
                "strength": pipe.resolve_strength(cfg.get("strength"), cfg.get("mask") is not None)
                if editing else None, "resample": editing.get("resample")}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {written} samples and grid.png to {out}")
    return out


def invert_and_regenerate(cfg: DictConfig, pipe: Pipeline, sampler, asked: list[tuple[str, dict]],
                          out: Path) -> Path:
    """DDIM-invert ``cfg.invert`` under the source prompt / label, then regenerate it under each asked one
    (the source itself when none is asked: a reconstruction)."""
    image = pipe.read_images(cfg.invert)
    source = {}
    if cfg.get("source_prompt") is not None:
        source["prompt"] = str(cfg.source_prompt)
    if cfg.get("source_label") is not None:
        source["label"] = cfg.source_label
    conditional = not isinstance(pipe.conditioner, NoConditioning)
    x_T = pipe.invert(image, **(source if conditional else {}), sampler=sampler, progress=cfg.progress)
    edits = []
    out.mkdir(parents=True, exist_ok=True)
    for stem, request in (asked if asked != [("", {})] else [("reconstruction", source)]):
        scale = 1.0 if stem == "reconstruction" else cfg.get("guidance_scale")
        edited = pipe(noise=x_T, **(request if conditional else {}), unconditional=conditional and not request,
                      sampler=sampler, guidance_scale=scale, progress=cfg.progress).float().cpu()
        save_image(edited, out / f"inverted_{stem or 'unconditional'}.png")
        edits.append(edited)
    grid = torch.cat([image.cpu(), *edits])
    save_image(make_grid(grid, nrow=grid.shape[0], padding=2, pad_value=1.0), out / "grid.png")
    settings = {"ckpt": str(cfg.ckpt), "invert": str(cfg.invert), "source": source or None,
                "targets": [r for _, r in asked if r] or None,
                "guidance_scale": pipe.resolve_guidance(cfg.get("guidance_scale")),
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
