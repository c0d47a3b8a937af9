"""``python -m difflab.cli.nfe_sweep ckpt=PATH [samplers=[...]] [steps=[...]] [n=500]``: quality against cost on one
checkpoint. Every sampler at every step count draws n samples with the same seeds and conditions; each setting gets
its FID with a bootstrap interval, the network evaluations per sample it took (counted, not computed: a guided
evaluation is one batched forward of the conditional and unconditional inputs) and its wall time. Writes
``table.md``, ``results.json`` and ``fid_vs_nfe.png`` (the Pareto front marked); "within noise" marks the settings
whose paired difference from the best FID has an interval covering 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab import all_ranks, launch
from difflab.cli.errors import hydra_main
from difflab.evaluation import RealImages, Scorer, class_judge, generate, judge_correct, run_name
from difflab.loading import load_model
from difflab.plots import pareto_front, plot_quality_cost


def sweep(cfg: DictConfig) -> tuple[list[dict], dict]:
    """(one row per (sampler, steps): nfe, seconds, fid, fid_interval, within_noise_of_best, pareto, and
    class_accuracy when a judge is at hand; the real-vs-real floor at this n)."""
    device = launch.start(cfg.device, cfg.devices, cfg.num_nodes)
    model = load_model(cfg.ckpt, device, trust=cfg.get("trust"))
    real = RealImages.of(model.run_config["data"], cfg.n, cfg.seed, stored=True, trust=cfg.get("trust"))
    calls = []
    hook = model.network.register_forward_pre_hook(lambda *_: calls.append(1))
    rows, sets = [], []
    try:
        for name in cfg.samplers:
            for steps in cfg.steps:
                calls.clear()
                start = time.perf_counter()
                generated = generate(model, cfg.n, sampler=name, steps=steps, guidance_scale=cfg.guidance_scale,
                                     seed=cfg.seed + 1, batch_size=cfg.batch_size, progress=cfg.progress)
                batches = -(-len(all_ranks.share(cfg.n)) // cfg.batch_size)  # this process's
                rows.append({"sampler": name, "steps": steps, "nfe": len(calls) / batches,
                             "seconds": time.perf_counter() - start, **generated.settings})
                sets.append(generated)
    finally:
        hook.remove()
    scoring = Scorer(instantiate(cfg.extractor), real, ("fid",), cfg.batch_size, bootstrap=cfg.bootstrap,
                     level=cfg.confidence, seed=cfg.seed, progress=cfg.progress and all_ranks.rank() == 0,
                     device=device)
    judge, _ = class_judge(cfg.classifier, real.dataset, model.pipeline().class_names, cfg.get("trust")) \
        if sets[0].labels is not None else (None, None)
    correct = None if judge is None else [judge_correct(judge, g.images, g.labels) for g in sets]
    scores = scoring.score([g.images for g in sets], correct)
    best = min(range(len(rows)), key=lambda k: scores.sets[k]["fid"])
    front = set(pareto_front([(row["nfe"], figures["fid"]) for row, figures in zip(rows, scores.sets, strict=True)]))
    for k, (row, figures) in enumerate(zip(rows, scores.sets, strict=True)):
        row.update(figures, pareto=k in front, extractor=scoring.extractor.name)
        gap = scores.difference("fid", best, k)
        row["within_noise_of_best"] = None if gap is None else gap.covers(0.0)
    return rows, scoring.floor()


def table(rows: list[dict], floor: dict) -> str:
    """The rows as a markdown table, fewest evaluations first, under a line with the real-vs-real floor."""
    accuracy = "class_accuracy" in rows[0]
    head = ["sampler", "steps", "NFE", "seconds", "FID [interval]", "within noise of best", "Pareto"]
    lines = [f"Real-vs-real FID floor: {floor['fid_real_vs_real']:.3f} (n={floor['fid_real_vs_real_n']})\n"
             if floor else "No real-vs-real floor (too few real images)\n",
             "| " + " | ".join(head + (["class accuracy"] if accuracy else [])) + " |",
             "|" + "|".join("---" for _ in range(len(head) + accuracy)) + "|"]
    for row in sorted(rows, key=lambda row: (row["nfe"], row["fid"])):
        low, high = row.get("fid_interval", (float("nan"), float("nan")))
        cells = [row["sampler"], str(row["steps"]), f"{row['nfe']:g}", f"{row['seconds']:.1f}",
                 f"{row['fid']:.3f} [{low:.3f}, {high:.3f}]",
                 {True: "yes", False: "no", None: "-"}[row["within_noise_of_best"]], "*" if row["pareto"] else ""]
        lines.append("| " + " | ".join(cells + ([f"{row['class_accuracy']:.3f}"] if accuracy else [])) + " |")
    return "\n".join(lines) + "\n"


@hydra_main("nfe_sweep")
def main(cfg: DictConfig) -> None:
    rows, floor = sweep(cfg)
    if all_ranks.rank() != 0:  # every process holds the same rows; one writes them
        return
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "eval" / f"nfe_sweep_n{cfg.n}"
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, floor)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"ckpt": str(cfg.ckpt), "n": cfg.n, "rows": rows, **floor},
                                                 indent=2))
    plot_quality_cost(rows, out / "fid_vs_nfe.png", floor=floor.get("fid_real_vs_real"),
                      title=f"{run_name(cfg.ckpt)}: FID ({rows[0]['extractor']}, n={cfg.n}) against cost")
    print(text, end="")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'fid_vs_nfe.png'}")


if __name__ == "__main__":
    main()
