"""``python sample.py ckpt=PATH n=64 sampler=ddim steps=50 seed=0 out=DIR``: samples from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from difflab.cli import CONFIG_DIR
from difflab.lightning import DiffusionModule


def load_module(ckpt: str | Path, device: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild the trained module from the run config stored in a train.py checkpoint and load its weights."""
    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first: python train.py)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    run_config = checkpoint.get("difflab_config")
    if run_config is None:
        raise ValueError(f"{path} has no difflab run config: was it written by difflab's train.py?")
    module = instantiate(OmegaConf.create(run_config)["model"], _convert_="all")
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = run_config
    return module.to(device).eval()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def sample(cfg: DictConfig) -> Path:
    device = resolve_device(cfg.device)
    module = load_module(cfg.ckpt, device)
    sampler_cfg = OmegaConf.create(module.run_config["sampler"]) if cfg.get("sampler") is None else cfg.sampler
    if cfg.steps is not None:
        sampler_cfg = OmegaConf.merge(sampler_cfg, {"num_steps": cfg.steps})
    sampler = instantiate(sampler_cfg)(module.schedule)
    out = Path(cfg.out) if cfg.out else (Path(cfg.ckpt).resolve().parent.parent / "generated" /
                                         f"{sampler.name}_{sampler.num_steps}steps_seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    images = []
    for start in range(0, cfg.n, cfg.batch_size):
        batch = module.generate(min(cfg.batch_size, cfg.n - start), sampler=sampler, generator=generator,
                                progress=cfg.progress, use_ema=cfg.use_ema)
        images.append((batch.float().cpu() + 1) / 2)
    images = torch.cat(images)
    for i, image in enumerate(images):
        save_image(image, out / f"{i:04d}_seed{cfg.seed}.png")
    save_image(make_grid(images, nrow=math.ceil(math.sqrt(cfg.n)), padding=2, pad_value=1.0), out / "grid.png")
    settings = {"ckpt": str(cfg.ckpt), "n": cfg.n, "seed": cfg.seed, "use_ema": cfg.use_ema,
                "sampler": OmegaConf.to_container(sampler_cfg), "device": str(device)}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {cfg.n} samples and grid.png to {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
