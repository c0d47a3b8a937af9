"""``python evaluate.py ckpt=PATH n=1000 [sampler=ddim steps=25 guidance_scale=3]`` or ``samples=DIR``: FID of
generated images against the training images on a feature extractor (default: the digit classifier's
features), always next to the real-vs-real floor at the same n; for class-conditional checkpoints also the share
of samples the classifier sees as the class asked for. Prints a table, writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from difflab.cli import CONFIG_DIR
from difflab.cli.sample import checkpoint_sampler, load_module, resolve_device
from difflab.conditioning import ClassConditioner
from difflab.metrics.classifier import load_digit_classifier, predict
from difflab.metrics.features import feature_statistics as features
from difflab.metrics.frechet import frechet_distance_of


def load_images(folder: str | Path, n: int) -> torch.Tensor:
    """Up to n PNG / JPEG images of a folder (sorted by name, grid.png skipped) as (N, C, H, W) in [-1, 1]."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.stem != "grid")
    if not files:
        raise ValueError(f"no .png / .jpg images in {folder}")
    images = []
    for path in files[:n]:
        try:
            with Image.open(path) as image:
                images.append(pil_to_tensor(image.convert("L")).float() / 127.5 - 1)
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
    return torch.stack(images)


def evaluate(cfg: DictConfig) -> dict:
    if (cfg.ckpt is None) == (cfg.samples is None):
        raise ValueError("give either ckpt=PATH (generate and evaluate) or samples=DIR (evaluate images)")
    device = resolve_device(cfg.device)
    extractor = instantiate(cfg.extractor).to(device)
    module = load_module(cfg.ckpt, device) if cfg.ckpt else None
    data_cfg = OmegaConf.create(module.run_config["data"]) if module is not None else cfg.data
    train_set = instantiate(data_cfg).train_set
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_set), generator=generator)
    n = cfg.n
    real = torch.stack([train_set[int(i)]["image"] for i in order[:n]])
    floor_n = min(n, len(train_set) - n)
    other = torch.stack([train_set[int(i)]["image"] for i in order[n:n + floor_n]]) if floor_n >= 2 else None
    result = {"n": n, "extractor": extractor.name, "seed": cfg.seed}
    labels = None
    if module is not None:
        sampler, sampler_cfg = checkpoint_sampler(cfg, module)
        conditions = module.conditioner.examples(n, device)
        labels = conditions.get("class_labels") if isinstance(module.conditioner, ClassConditioner) else None
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        batches = []
        for start in tqdm(range(0, n, cfg.batch_size), desc="generating", disable=not cfg.progress):
            count = min(cfg.batch_size, n - start)
            condition = {k: v[start:start + count] for k, v in conditions.items()}
            batches.append(module.generate(count, sampler=sampler, generator=gen, condition=condition,
                                           guidance_scale=cfg.guidance_scale).float().cpu())
        fake = torch.cat(batches)
        result.update(ckpt=str(cfg.ckpt), sampler=OmegaConf.to_container(sampler_cfg),
                      guidance_scale=module.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale)
    else:
        fake = load_images(cfg.samples, n)
        result.update(samples=str(cfg.samples))
        if len(fake) < n:
            raise ValueError(f"{cfg.samples} has {len(fake)} images, fewer than n={n}: lower n (FIDs are only "
                             "comparable at equal n)")
    real_stats = features(extractor, real.to(device), cfg.batch_size)
    result["fid"] = frechet_distance_of(real_stats, features(extractor, fake.to(device), cfg.batch_size))
    if other is not None:
        result["fid_real_vs_real"] = frechet_distance_of(real_stats, features(extractor, other.to(device),
                                                                              cfg.batch_size))
        result["fid_real_vs_real_n"] = floor_n
    if labels is not None:
        predicted = predict(load_digit_classifier(), fake).argmax(-1)
        result["class_accuracy"] = (predicted == labels.cpu()).float().mean().item()
    return result


def report(result: dict) -> str:
    rows = [("FID (" + result["extractor"] + f", n={result['n']})", f"{result['fid']:.4f}")]
    if "fid_real_vs_real" in result:
        rows.append((f"real vs real floor (n={result['fid_real_vs_real_n']})", f"{result['fid_real_vs_real']:.4f}"))
    if "class_accuracy" in result:
        rows.append(("class accuracy (asked digit)", f"{result['class_accuracy']:.3f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    result = evaluate(cfg)
    print(report(result))
    out = Path(cfg.out) if cfg.out else (Path(cfg.ckpt).resolve().parent.parent / "eval" / f"fid_n{cfg.n}.json"
                                         if cfg.ckpt else Path(cfg.samples) / f"fid_n{cfg.n}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
