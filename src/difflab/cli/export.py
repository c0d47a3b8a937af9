"""``python -m difflab.export ckpt=PATH out=DIR [format=diffusers|safetensors] [push_to_hub=REPO]``: a trained
model as a folder for ``difflab.load``, diffusers and the Hub (see ``difflab.export``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from difflab.cli.errors import hydra_main


@hydra_main("export")
def main(cfg: DictConfig) -> Path:
    from difflab.export import export

    return export(cfg.ckpt, cfg.out, cfg.format, cfg.push_to_hub, use_ema=cfg.use_ema, private=cfg.private,
                  overwrite=cfg.overwrite, trust=cfg.get("trust"))


if __name__ == "__main__":
    main()
