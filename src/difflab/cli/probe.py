"""``python -m difflab.probe ckpt=PATH probe=NAME``: one probe of a trained model (difflab.probe), printed as a
table and written as ``<probe>.json`` and ``<probe>.png`` into ``out`` (default ``<run dir>/probes``)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from difflab import probe
from difflab.cli.errors import hydra_main
from difflab.errors import UsageError
from difflab.evaluation import run_name
from difflab.files import write_text
from difflab.loading import load_model, resolve_device
from difflab.model import DiffusionModel
from difflab.plots import save_figure
from difflab.probe.bayes_gap import mixture_of
from difflab.probe.cross_attention import text_part


def run_probe(cfg: DictConfig, model: DiffusionModel | None = None):
    """The probe's result for the config (``model``: the checkpoint's, already loaded with ``use_ema`` as asked)."""
    if cfg.probe not in probe.PROBES:
        raise UsageError(f"probe={cfg.probe} is not a probe: valid: {', '.join(probe.PROBES)}")
    if model is None:
        model = load_model(cfg.ckpt, resolve_device(cfg.device), use_ema=cfg.use_ema, trust=cfg.get("trust"))
    pipe = model.pipeline()
    timesteps = None if cfg.timesteps is None else list(cfg.timesteps)
    if cfg.probe == "bayes_gap":
        return probe.bayes_gap(pipe, mixture_of(model.run_config), n=cfg.n, seed=cfg.seed)
    if cfg.probe == "cross_attention":
        prompts = list(cfg.prompts) if cfg.prompts is not None else None
        if prompts is None:
            prompts = text_part(pipe).example_prompts[:4]
        return probe.cross_attention(pipe, prompts, seed=cfg.seed, steps=cfg.steps)
    batch = probe.real_batch(model.run_config, n=cfg.n, seed=cfg.seed, trust=cfg.get("trust"))
    if cfg.probe == "cfg_gap":
        return probe.guidance_gap(pipe, batch, timesteps, seed=cfg.seed)
    return probe.t_response(pipe, batch, timesteps, cfg.reference_t, seed=cfg.seed)


@hydra_main("probe")
def main(cfg: DictConfig) -> None:
    result = run_probe(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "probes"
    name = cfg.probe
    record = {"ckpt": str(cfg.ckpt), "settings": OmegaConf.to_container(cfg), **result.to_dict()}
    write_text(out / f"{name}.json", json.dumps(record, indent=1))
    save_figure(result.figure(title=f"{run_name(cfg.ckpt)}: {name}"), out / f"{name}.png")
    print(result.table(), end="")
    print(f"wrote {out / (name + '.json')}, {out / (name + '.png')}")


if __name__ == "__main__":
    main()
