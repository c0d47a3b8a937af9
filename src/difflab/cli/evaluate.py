"""``python evaluate.py ckpt=PATH [n=1000] [sampler=ddim steps=25 guidance_scale=3]`` or ``samples=DIR``: FID, KID,
precision/recall and the Inception Score of generated images against the training images, on the features that
fit the data (``extractor=auto``: the digit classifier's for digits, Inception's otherwise), FID and KID next to
their real-vs-real floor at the same n, each figure with a bootstrap confidence interval; class accuracy when a
classifier for the data is at hand (MNIST's own, or ``classifier=PATH``).

``compare=[CKPT_A,CKPT_B]`` (or, with ``ckpt=``, two settings such as ``compare='[{steps:50},{sampler:dpmpp_2m,
steps:20}]'``) generates both with the same seeds and conditions and reports B - A with its interval, "within noise"
when the interval covers 0; three settings or more (e.g. the post-hoc EMA lengths of one run) report each one minus A.
Prints a table, writes JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from difflab import all_ranks, launch
from difflab.cli.errors import hydra_main
from difflab.cli.sample import chosen_sampler
from difflab.data.images import image_files, load_images
from difflab.errors import UsageError
from difflab.evaluation import RealImages, Scorer, class_judge, generate, judge_correct, judge_held_out, run_name
from difflab.loading import load_model

DEFAULT_N = 1000  # generated images when n is not given (a checkpoint)
SETTING_KEYS = ("ckpt", "sampler", "steps", "guidance_scale", "use_ema")


def scorer(cfg: DictConfig, real: RealImages, device) -> Scorer:
    return Scorer(instantiate(cfg.extractor), real, tuple(cfg.metrics), cfg.batch_size, cfg.kid_subsets,
                  cfg.kid_subset_size, cfg.bootstrap, cfg.confidence, cfg.seed,
                  cfg.progress and all_ranks.rank() == 0, device=device)


def evaluate(cfg: DictConfig) -> dict:
    if cfg.get("compare"):
        return compare(cfg)
    if (cfg.ckpt is None) == (cfg.samples is None):
        raise UsageError("give either ckpt=PATH (generate and evaluate) or samples=DIR (evaluate images)")
    device = launch.start(cfg.device, cfg.devices, cfg.num_nodes)
    model = load_model(cfg.ckpt, device, use_ema=cfg.use_ema, trust=cfg.get("trust")) if cfg.ckpt else None
    if model is not None:
        n = cfg.n or DEFAULT_N
        real = RealImages.of(model.run_config["data"], n, cfg.seed, stored=True, trust=cfg.get("trust"))
    else:
        with samples_folder():
            n = cfg.n or len(image_files(cfg.samples))
        real = RealImages.of(cfg.data, n, cfg.seed)
    result = {"n": n, "n_real": len(real.images), "seed": cfg.seed, "notes": []}
    if len(real.images) < n:
        result["notes"].append(f"the data has {len(real.images)} training images: {n} samples are scored against "
                               f"{len(real.images)} real ones, and there is no real-vs-real floor")
    labels = None
    if model is not None:
        sampler, sampler_cfg = chosen_sampler(cfg, model)
        generated = generate(model, n, sampler=sampler, guidance_scale=cfg.guidance_scale, seed=cfg.seed + 1,
                             batch_size=cfg.batch_size, progress=cfg.progress)
        fake, labels = generated.images, generated.labels
        result.update(ckpt=str(cfg.ckpt), sampler=sampler_cfg, guidance_scale=generated.settings["guidance_scale"])
    else:
        with samples_folder():
            folder = load_images(cfg.samples, real.images.shape[1], real.images.shape[-1], n)
        if len(folder.images) < n:
            raise UsageError(f"{cfg.samples} has {len(folder.images)} images, fewer than n={n}: lower n (FIDs are "
                             "only comparable at equal n)")
        part = all_ranks.share(n)  # every process reads the folder and featurises its share
        fake = folder.images[part.start:part.stop]
        result.update(samples=str(cfg.samples))
        result["notes"] += folder.notes(real.images.shape[-1])
    scoring = scorer(cfg, real, device)
    correct = None
    if labels is not None:
        judge, about = class_judge(cfg.classifier, real.dataset, model.pipeline().class_names, cfg.get("trust"))
        if judge is None:
            result["notes"].append(about)
        else:
            correct = [judge_correct(judge, fake, labels)]
            result["classifier"] = about
            result["class_accuracy_real"] = judge_correct(judge, *judge_held_out(about, real)).mean().item()
    result.update(extractor=scoring.extractor.name, **scoring.score([fake], correct).sets[0], **scoring.floor())
    if cfg.get("clip_model") and model is not None and hasattr(model.conditioner, "example_prompts"):
        result["clip_score"] = clip_score(cfg, model.conditioner.example_prompts, (fake + 1) / 2, n)
    result.update(confidence=cfg.confidence, bootstrap=cfg.bootstrap, warnings=scoring.warnings)
    return result


@contextmanager
def samples_folder() -> Iterator[None]:
    """Reading ``samples=DIR``: its refusals (no images, an unreadable one) are about the user's folder."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from err


def clip_score(cfg: DictConfig, example_prompts: list[str], images, n: int) -> float:
    """Mean CLIPScore of the n samples (in [0, 1]) against the prompts they were generated from (the conditioner's
    examples, in the order ``examples(n)`` gives them); ``images``: this process's share of them."""
    import torch

    from difflab.conditioning.base import example_indices
    from difflab.metrics.clip_score import CLIPScore

    scorer_ = CLIPScore.from_pretrained(cfg.clip_model, local_files_only=bool(cfg.get("clip_local_files_only")))
    part = all_ranks.share(n)
    prompts = [example_prompts[i % len(example_prompts)] for i in example_indices(n, len(example_prompts))][
        part.start:part.stop]
    scores = [scorer_(images[start:start + cfg.batch_size], prompts[start:start + cfg.batch_size])
              for start in range(0, len(images), cfg.batch_size)]
    return all_ranks.gather(torch.cat(scores)).mean().item()


def settings(cfg: DictConfig) -> list[dict]:
    """The settings of ``compare`` (two or more): each a checkpoint path or a dict of ckpt / sampler / steps /
    guidance_scale / use_ema over the command line's."""
    entries = list(cfg.compare)
    if len(entries) < 2:
        raise UsageError(f"compare takes two settings or more (A, B, ...), got {len(entries)}")
    out = []
    for entry in entries:
        entry = {"ckpt": entry} if isinstance(entry, str) else OmegaConf.to_container(entry)
        unknown = set(entry) - set(SETTING_KEYS)
        if unknown:
            raise UsageError(f"unknown compare keys {sorted(unknown)}; valid: {', '.join(SETTING_KEYS)}")
        setting = {"ckpt": cfg.ckpt, "sampler": None, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                   "use_ema": cfg.use_ema, **entry}
        if setting["ckpt"] is None:
            raise UsageError("compare needs a checkpoint for each setting: compare=[CKPT_A,CKPT_B], or ckpt=PATH")
        out.append(setting)
    return out


def compare(cfg: DictConfig) -> dict:
    """A, B, ... generated with the same seeds and conditions, scored against the same real images: each figure,
    and each setting's difference from A with its paired-bootstrap interval ("a", "b" and "difference" too when
    there are two, as evaluate.py has always written them)."""
    device = launch.start(cfg.device, cfg.devices, cfg.num_nodes)
    chosen = settings(cfg)
    models = {key: load_model(key[0], device, use_ema=key[1], trust=cfg.get("trust"))
              for key in dict.fromkeys((s["ckpt"], bool(s["use_ema"])) for s in chosen)}
    chosen_models = [models[s["ckpt"], bool(s["use_ema"])] for s in chosen]
    data = [model.run_config["data"] for model in chosen_models]
    if any(d != data[0] for d in data):
        raise UsageError("compare needs models of the same data: their data configs differ")
    n = cfg.n or DEFAULT_N
    real = RealImages.of(data[0], n, cfg.seed, stored=True, trust=cfg.get("trust"))
    default_sampler = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
    generated = [generate(model, n, sampler=s["sampler"] or default_sampler, steps=s["steps"],
                          guidance_scale=s["guidance_scale"], seed=cfg.seed + 1, batch_size=cfg.batch_size,
                          progress=cfg.progress) for model, s in zip(chosen_models, chosen, strict=True)]
    for g, s in zip(generated, chosen, strict=True):
        g.settings["use_ema"] = s["use_ema"]
    labels = [g.labels for g in generated]
    if any((other is None) != (labels[0] is None) or other is not None and not other.equal(labels[0])
           for other in labels):
        raise UsageError("compare needs the same conditions for every setting (models with the same classes)")
    scoring = scorer(cfg, real, device)
    correct, notes = None, []
    if labels[0] is not None:
        judge, note = class_judge(cfg.classifier, real.dataset, chosen_models[0].pipeline().class_names,
                                  cfg.get("trust"))
        if judge is not None:
            correct = [judge_correct(judge, g.images, g.labels) for g in generated]
        else:
            notes.append(note)
    scores = scoring.score([g.images for g in generated], correct)
    for s, g, figures in zip(chosen, generated, scores.sets, strict=True):
        figures.update(ckpt=str(s["ckpt"]), **g.settings)
    differences = [{name: scores.difference(name, 0, k).as_dict() for name in scores.replicates}
                   for k in range(1, len(chosen))]
    result = {"n": n, "n_real": len(real.images), "seed": cfg.seed, "extractor": scoring.extractor.name,
              "settings": scores.sets, "differences_from_a": differences, **scoring.floor(),
              "confidence": cfg.confidence, "bootstrap": cfg.bootstrap, "warnings": scoring.warnings, "notes": notes}
    if len(chosen) == 2:
        result.update(a=scores.sets[0], b=scores.sets[1], difference=differences[0])
    return result


def _with_interval(result: dict, key: str, digits: int) -> str:
    value = f"{result[key]:.{digits}f}"
    if f"{key}_interval" in result:
        low, high = result[f"{key}_interval"]
        value += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return value


def report(result: dict) -> str:
    """The table evaluate.py prints."""
    if "settings" in result:
        return report_comparison(result)
    level = f"{result['confidence']:.0%} intervals" if result.get("bootstrap") else "no intervals"
    rows = [(f"FID ({result['extractor']}, n={result['n']}; {level})", _with_interval(result, "fid", 4))]
    if "fid_real_vs_real" in result:
        rows.append((f"  real vs real floor (n={result['fid_real_vs_real_n']})", f"{result['fid_real_vs_real']:.4f}"))
    if "kid" in result:
        rows.append(("KID", _with_interval(result, "kid", 5)))
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
        rows.append(("class accuracy (asked class)", _with_interval(result, "class_accuracy", 3)))
    if "class_accuracy_real" in result:
        rows.append(("  the classifier on held-out real images", f"{result['class_accuracy_real']:.3f}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines + [f"note: {n}" for n in result.get("notes", [])] +
                     [f"warning: {w}" for w in result.get("warnings", [])])


def _describe(s: dict) -> str:
    return (f"{run_name(s['ckpt'])}, {s['sampler']} {s['steps']} steps, w={s['guidance_scale']:g}"
            + ("" if s.get("use_ema", True) else ", raw weights"))


def _change(diff: dict | None, a: float, b: float, digits: int) -> tuple[str, str]:
    """(B - A with its interval, the verdict) of a paired difference."""
    if diff is None:
        return f"{b - a:+.{digits}f}", ""
    change = f"{diff['estimate']:+.{digits}f} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]"
    verdict = "within noise" if diff["low"] <= 0 <= diff["high"] else ("B higher" if diff["low"] > 0 else "B lower")
    return change, verdict


def report_comparison(result: dict) -> str:
    """Two settings: A and B side by side with B - A, its interval and whether it is within noise; more: one row
    per setting with its figures and its difference from A."""
    sets = result["settings"]
    letters = [chr(ord("A") + k) if k < 26 else f"#{k}" for k in range(len(sets))]
    lines = [f"{letter}: {_describe(s)}" for letter, s in zip(letters, sets, strict=True)]
    lines.append(f"{result['extractor']} features, n={result['n']}, paired seeds; "
                 f"{result['confidence']:.0%} bootstrap intervals ({result['bootstrap']} resamples)")
    keys = [(key, digits) for key, digits in (("fid", 4), ("kid", 5), ("class_accuracy", 3)) if key in sets[0]]
    if len(sets) == 2:
        a, b = sets
        rows = [("", "A", "B", "B - A", "")]
        for key, digits in keys:
            change, verdict = _change(result["differences_from_a"][0].get(key), a[key], b[key], digits)
            rows.append((key, _with_interval(a, key, digits), _with_interval(b, key, digits), change, verdict))
    else:
        rows = [("", *(cell for key, _ in keys for cell in (key, f"{key} - A", "")))]
        for k, (letter, s) in enumerate(zip(letters, sets, strict=True)):
            cells = []
            for key, digits in keys:
                change, verdict = ("", "") if k == 0 else _change(result["differences_from_a"][k - 1].get(key),
                                                                  sets[0][key], s[key], digits)
                cells += [_with_interval(s, key, digits), change, verdict.replace("B ", f"{letter} ")]
            rows.append((letter, *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines + [f"note: {n}" for n in result.get("notes", [])] +
                     [f"warning: {w}" for w in result.get("warnings", [])])


def default_out(cfg: DictConfig, result: dict) -> Path:
    """``out`` or, beside the run: <run dir>/eval/fid_n<n>.json (compare_n<n>.json); <samples>/fid_n<n>.json."""
    if cfg.out:
        return Path(cfg.out)
    if "settings" in result:
        return Path(result["settings"][0]["ckpt"]).resolve().parent.parent / "eval" / f"compare_n{result['n']}.json"
    if cfg.ckpt:
        return Path(cfg.ckpt).resolve().parent.parent / "eval" / f"fid_n{result['n']}.json"
    return Path(cfg.samples) / f"fid_n{result['n']}.json"


@hydra_main("evaluate", unused=lambda cfg: () if cfg.get("samples") else ("data",))
def main(cfg: DictConfig) -> None:
    result = evaluate(cfg)
    if all_ranks.rank() != 0:  # every process holds the same figures; one reports them
        return
    print(report(result))
    out = default_out(cfg, result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
