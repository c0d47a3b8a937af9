"""``python evaluate.py ckpt=PATH n=1000 [sampler=ddim steps=25 guidance_scale=3]`` or ``samples=DIR``: FID, KID,
precision/recall and the Inception Score of generated images against the training images on a feature extractor
(``extractor=digit``, the shipped classifier's features, or ``extractor=inception``), FID and KID always next to
their real-vs-real floor at the same n; for class-conditional checkpoints also the share of samples the classifier
sees as the class asked for. Prints a table, writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from difflab.cli import CONFIG_PACKAGE
from difflab.cli.sample import checkpoint_sampler
from difflab.conditioning.base import ClassConditioner, example_indices
from difflab.loading import load_module, resolve_device
from difflab.metrics.classifier import load_digit_classifier, predict
from difflab.metrics.features import extract
from difflab.metrics.frechet import FeatureStatistics, frechet_distance_of
from difflab.metrics.scores import inception_score, kernel_inception_distance, precision_recall

METRICS = ("fid", "kid", "prc", "isc")


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


def scores(cfg: DictConfig, extractor, real: torch.Tensor, fake: torch.Tensor, other: torch.Tensor | None) -> dict:
    """The asked metrics of ``fake`` against ``real`` on the extractor's features; FID and KID also for ``other``
    (real images not in ``real``): the real-vs-real floor at the same n."""
    unknown = set(cfg.metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; valid: {', '.join(METRICS)}")
    f_real, f_fake = extract(extractor, real, cfg.batch_size), extract(extractor, fake, cfg.batch_size)
    real_stats = FeatureStatistics.of(f_real)
    out = {"fid": frechet_distance_of(real_stats, FeatureStatistics.of(f_fake))}
    f_other = extract(extractor, other, cfg.batch_size) if other is not None else None
    if f_other is not None:
        out["fid_real_vs_real"] = frechet_distance_of(real_stats, FeatureStatistics.of(f_other))
        out["fid_real_vs_real_n"] = len(other)
    if "kid" in cfg.metrics:
        out["kid"], out["kid_std"] = kernel_inception_distance(f_real, f_fake, cfg.kid_subsets, cfg.kid_subset_size)
        if f_other is not None:
            out["kid_real_vs_real"], _ = kernel_inception_distance(f_real, f_other, cfg.kid_subsets,
                                                                    cfg.kid_subset_size)
    if "prc" in cfg.metrics:
        out["precision"], out["recall"] = precision_recall(f_real, f_fake)
    if "isc" in cfg.metrics and getattr(extractor, "has_logits", False):
        out["inception_score"], out["inception_score_std"] = inception_score(
            extract(extractor, fake, cfg.batch_size, logits=True))
    return out


def clip_score(cfg: DictConfig, example_prompts: list[str], fake: torch.Tensor) -> float:
    """Mean CLIPScore of samples against the prompts they were generated from (the conditioner's examples, in
    the order ``examples(n)`` gives them)."""
    from difflab.metrics.clip_score import CLIPScore

    scorer = CLIPScore.from_pretrained(cfg.clip_model, local_files_only=bool(cfg.get("clip_local_files_only")))
    prompts = [example_prompts[i % len(example_prompts)] for i in example_indices(len(fake), len(example_prompts))]
    scores = [scorer(fake[start:start + cfg.batch_size], prompts[start:start + cfg.batch_size])
              for start in range(0, len(fake), cfg.batch_size)]
    return torch.cat(scores).mean().item()


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
        conditions = module.conditioner.examples(n, device)  # balanced: every class (prompt) equally often
        labels = conditions.get("class_labels") if isinstance(module.conditioner, ClassConditioner) else None
        fake = module.pipeline()(condition=conditions or None, n=None if conditions else n, sampler=sampler,
                                 seed=cfg.seed + 1, guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size,
                                 progress=cfg.progress).float().cpu() * 2 - 1
        result.update(ckpt=str(cfg.ckpt), sampler=OmegaConf.to_container(sampler_cfg),
                      guidance_scale=module.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale)
    else:
        fake = load_images(cfg.samples, n)
        result.update(samples=str(cfg.samples))
        if len(fake) < n:
            raise ValueError(f"{cfg.samples} has {len(fake)} images, fewer than n={n}: lower n (FIDs are only "
                             "comparable at equal n)")
    result.update(scores(cfg, extractor, real, fake, other))
    if cfg.get("clip_model") and module is not None and hasattr(module.conditioner, "example_prompts"):
        result["clip_score"] = clip_score(cfg, module.conditioner.example_prompts, fake)
    if labels is not None:
        predicted = predict(load_digit_classifier(), fake).argmax(-1)
        result["class_accuracy"] = (predicted == labels.cpu()).float().mean().item()
    return result


def report(result: dict) -> str:
    rows = [("FID (" + result["extractor"] + f", n={result['n']})", f"{result['fid']:.4f}")]
    if "fid_real_vs_real" in result:
        rows.append((f"  real vs real floor (n={result['fid_real_vs_real_n']})", f"{result['fid_real_vs_real']:.4f}"))
    if "kid" in result:
        rows.append(("KID", f"{result['kid']:.5f} +- {result['kid_std']:.5f}"))
    if "kid_real_vs_real" in result:
        rows.append(("  real vs real floor", f"{result['kid_real_vs_real']:.5f}"))
    if "precision" in result:
        rows.append(("precision / recall", f"{result['precision']:.3f} / {result['recall']:.3f}"))
    if "inception_score" in result:
        rows.append((f"Inception Score ({result['extractor']} classes)",
                     f"{result['inception_score']:.3f} +- {result['inception_score_std']:.3f}"))
    if "clip_score" in result:
        rows.append(("CLIPScore (samples vs their prompts)", f"{result['clip_score']:.2f}"))
    if "class_accuracy" in result:
        rows.append(("class accuracy (asked digit)", f"{result['class_accuracy']:.3f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="evaluate")
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
