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
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from difflab.cli import CONFIG_DIR
from difflab.conditioning import NoConditioning
from difflab.data.images import load_image, load_mask
from difflab.diffusion.guidance import ClassifierGuidance
from difflab.lightning import DiffusionModule, NoisyClassifierModule


def load_module(ckpt: str | Path, device: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild the trained module from the run config stored in a train.py checkpoint and load its weights."""
    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first: python train.py)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    run_config = checkpoint.get("difflab_config")
    if run_config is None:
        raise ValueError(f"{path} has no difflab run config: was it written by difflab's train.py?")
    model_config = OmegaConf.create(run_config)["model"]
    if "difflab_first_stage" in checkpoint:  # latent diffusion: the first stage's architecture, weights below
        model_config.first_stage = OmegaConf.create(checkpoint["difflab_first_stage"])
    module = instantiate(model_config, _convert_="all")
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = run_config
    return module.to(device).eval()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def checkpoint_sampler(cfg: DictConfig, module: DiffusionModule):
    """(sampler, its config): ``cfg.sampler`` if chosen, else the one the checkpoint was trained with, with
    ``cfg.steps`` steps if given."""
    sampler_cfg = OmegaConf.create(module.run_config["sampler"]) if cfg.get("sampler") is None else cfg.sampler
    if cfg.get("steps") is not None:
        sampler_cfg = OmegaConf.merge(sampler_cfg, {"num_steps": cfg.steps})
    return instantiate(sampler_cfg)(module.schedule), sampler_cfg


def requests(cfg: DictConfig) -> list[tuple[str, dict]]:
    """[(file-name stem, from_request kwargs)] for each prompt / label asked for; [("", {})] for none."""
    prompts = cfg.get("prompt")
    if cfg.get("prompts_file"):
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    labels = cfg.get("label")
    if prompts is not None and labels is not None:
        raise ValueError("give prompt= (or prompts_file=) or label=, not both")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {prompt!r}")
        return [(slug(p), {"prompts": [p]}) for p in prompts]
    if labels is not None:
        labels = [labels] if isinstance(labels, int) else list(labels)
        return [(f"label{k}", {"labels": [k]}) for k in labels]
    return [("", {})]


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe form of a prompt: lowercase words joined by '_' ("empty" for the empty prompt)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "empty"


def sample(cfg: DictConfig) -> Path:
    device = resolve_device(cfg.device)
    module = load_module(cfg.ckpt, device)
    sampler, sampler_cfg = checkpoint_sampler(cfg, module)
    asked = requests(cfg)
    unconditional = isinstance(module.conditioner, NoConditioning)
    if asked != [("", {})] and unconditional and not cfg.get("classifier_ckpt"):
        raise ValueError(f"{cfg.ckpt} is an unconditional model: drop prompt= / label= (or guide it with a noisy "
                         "classifier: classifier_ckpt=PATH label=K)")
    guidance = module.guidance_scale if cfg.get("guidance_scale") is None else cfg.guidance_scale
    classifier = None
    if cfg.get("classifier_ckpt"):
        if not any("labels" in r for _, r in asked):
            raise ValueError("classifier guidance needs the classes to guide toward: label=K (or a list)")
        classifier = load_module(cfg.classifier_ckpt, device)
        if not isinstance(classifier, NoisyClassifierModule):
            raise ValueError(f"{cfg.classifier_ckpt} is not a noisy classifier (train one: python train.py "
                             "model=classifier)")
    editing = editing_inputs(cfg, module, device)
    out = Path(cfg.out) if cfg.out else (Path(cfg.ckpt).resolve().parent.parent / "generated" /
                                         f"{sampler.name}_{sampler.num_steps}steps_seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("invert"):
        return invert_and_regenerate(cfg, module, sampler, asked, guidance, out, device)
    rows = []
    for stem, request in asked:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)  # the same noise for every prompt
        images = []
        for start in range(0, cfg.n, cfg.batch_size):
            count = min(cfg.batch_size, cfg.n - start)
            condition = None
            if request and not unconditional:  # (an unconditional model may be guided by a classifier alone)
                condition = module.conditioner.from_request(
                    labels=request["labels"] * count if "labels" in request else None,
                    prompts=request["prompts"] * count if "prompts" in request else None, device=device)
            wrapper = None
            if classifier is not None:
                labels = torch.tensor(request["labels"] * count, device=device)
                wrapper = partial(ClassifierGuidance, classifier=classifier.network, labels=labels,
                                  scale=cfg.classifier_scale, schedule=module.schedule,
                                  prediction=module.loss.prediction)
            batch = module.generate(count, sampler=sampler, generator=generator, progress=cfg.progress,
                                    use_ema=cfg.use_ema, condition=condition, guidance_scale=guidance,
                                    guidance_rescale=cfg.guidance_rescale, model_wrapper=wrapper, **editing)
            images.append((batch.float().cpu() + 1) / 2)
        images = torch.cat(images)
        for i, image in enumerate(images):
            save_image(image, out / (f"{stem}_{i:03d}_seed{cfg.seed}.png" if stem else f"{i:04d}_seed{cfg.seed}.png"))
        rows.append(images)
    written = cfg.n * len(rows)
    nrow = cfg.n if len(rows) > 1 or editing else math.ceil(math.sqrt(cfg.n))
    if editing:  # a first row with the input (and the masked input, the region to regenerate in grey)
        shown = [editing["init"]] + ([editing["init"] * (1 - editing["mask"])] if "mask" in editing else [])
        nrow = max(nrow, len(shown))
        rows.insert(0, padded_row([(x[0].float().cpu() + 1) / 2 for x in shown], nrow))
    save_image(make_grid(torch.cat(rows), nrow=nrow, padding=2, pad_value=1.0), out / "grid.png")
    settings = {"ckpt": str(cfg.ckpt), "n": cfg.n, "seed": cfg.seed, "use_ema": cfg.use_ema,
                "sampler": OmegaConf.to_container(sampler_cfg), "device": str(device),
                "prompts": [r["prompts"][0] for _, r in asked if "prompts" in r] or None,
                "labels": [r["labels"][0] for _, r in asked if "labels" in r] or None,
                "guidance_scale": guidance, "guidance_rescale": cfg.guidance_rescale,
                "classifier_ckpt": cfg.get("classifier_ckpt"), "classifier_scale": cfg.get("classifier_scale"),
                "init_image": cfg.get("init_image"), "mask": cfg.get("mask"),
                "strength": editing.get("strength"), "resample": editing.get("resample")}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {written} samples and grid.png to {out}")
    return out


def editing_inputs(cfg: DictConfig, module: DiffusionModule, device: torch.device) -> dict:
    """``generate``'s editing arguments from ``init_image=``, ``strength=``, ``mask=``, ``resample=``."""
    if cfg.get("mask") and not cfg.get("init_image"):
        raise ValueError("mask= needs the image to inpaint: init_image=PATH")
    if cfg.get("invert") and cfg.get("init_image"):
        raise ValueError("give invert=PATH (DDIM inversion) or init_image=PATH (image-to-image / inpainting), not both")
    if not cfg.get("init_image"):
        return {}
    channels, size = module.pixel_shape[0], module.pixel_shape[-1]
    editing = {"init": load_image(cfg.init_image, channels, size).to(device)}
    if cfg.get("mask"):
        editing["mask"] = load_mask(cfg.mask, size).to(device)
        editing["resample"] = int(cfg.get("resample", 1))
    default_strength = 1.0 if "mask" in editing else 0.8  # diffusers' inpainting / image-to-image defaults
    editing["strength"] = default_strength if cfg.get("strength") is None else float(cfg.strength)
    return editing


def invert_and_regenerate(cfg: DictConfig, module: DiffusionModule, sampler, asked: list[tuple[str, dict]],
                          guidance: float, out: Path, device: torch.device) -> Path:
    """DDIM-invert ``cfg.invert`` under the source prompt / label, then regenerate it under each asked one
    (the source itself when none is asked: a reconstruction)."""
    channels, size = module.pixel_shape[0], module.pixel_shape[-1]
    image = load_image(cfg.invert, channels, size).to(device)
    source = {}
    if cfg.get("source_prompt") is not None:
        source["prompts"] = [cfg.source_prompt]
    if cfg.get("source_label") is not None:
        source["labels"] = [int(cfg.source_label)]
    unconditional = isinstance(module.conditioner, NoConditioning)
    source_condition = None if unconditional or not source else module.conditioner.from_request(**source,
                                                                                             device=device)
    x_T = module.invert(image, sampler=sampler, condition=source_condition, use_ema=cfg.use_ema,
                        progress=cfg.progress)
    edits = []
    for stem, request in (asked if asked != [("", {})] else [("reconstruction", source)]):
        condition = None if unconditional or not request else module.conditioner.from_request(**request,
                                                                                          device=device)
        scale = 1.0 if stem == "reconstruction" else guidance
        edited = module.generate(1, sampler=sampler, noise=x_T, condition=condition, guidance_scale=scale,
                                 use_ema=cfg.use_ema, progress=cfg.progress)
        edited = (edited.float().cpu() + 1) / 2
        save_image(edited, out / f"inverted_{stem or 'unconditional'}.png")
        edits.append(edited)
    grid = torch.cat([(image.float().cpu() + 1) / 2, *edits])
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
