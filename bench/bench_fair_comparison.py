"""Time to quality, fairly (issue 35): networks x recipes at one budget, every recipe tuned alike, two metrics.

    python bench/bench_fair_comparison.py sweep    [--budget-min 6]              # every recipe's tuning grid
    python bench/bench_fair_comparison.py headline [--budget-min 12] [--seeds 3]  # the 2x2, defaults, best tuned
    python bench/bench_fair_comparison.py report   [--budget-min 12]              # the tables of what has run

A run is (recipe, network, setting, seed) trained for the same wall-clock budget on this machine:
  recipes   difflab (``python train.py conditioning=none``: its budget LR schedule, logit-normal t, EMA 0.999),
            diffusers (examples/unconditional_image_generation/train_unconditional.py, bench_time_to_quality.py),
            lucidrains (denoising-diffusion-pytorch's Trainer defaults, if installed; its own network only)
  networks  small (difflab's default UNet, 0.72M), unet2d (diffusers' UNet2DModel at the same widths: 16 / 32 /
            64, attention at 8x8; in difflab's recipe through network=diffusers_unet)
  settings  default (the recipe as published) or lr x batch with the LR schedule and EMA sized to the budget
            (``sweep``: lr 1e-4, 3e-4, 1e-3, 2e-3 x batch 16, 64 for every recipe, difflab's included)
``headline`` runs the 2x2 {small, unet2d} x {difflab, diffusers} at their defaults, and every recipe at its best
sweep setting (by the first digit FID, as difflab's recipe was chosen), ``--seeds`` times, interleaved: every cell
at seed 0, then every cell at seed 1, ... so that the machine's drift hits all cells alike.

Every final EMA is sampled (DPM-Solver++ 20 steps, seeds 0..n-1) twice: as is, and with x0 clipped to [-1, 1]
(the peers' samplers clip by default); both are scored by the digit FID (the classifier difflab was tuned on),
the check classifier's FID (``extractor=digit_check``: another architecture, seed and training split) and
Inception FID / KID, each with its bootstrap interval and real-vs-real floor at n. Each run leaves
``<out>/<run>.json`` and ``<out>/<run>.png`` (the first 100 samples): an interrupted bench resumes where it
stopped, and ``report`` reads them. ``--threads 1`` under ``taskset -c 0`` gives every run the same one core while the
other core does other work; each JSON records the threads, the process's CPU seconds beside the wall-clock ones and
the load average over its run, so that a run that shared its core shows (CPU / wall below 1 per thread).
Ratios are peer / difflab per seed (the same seed index), summarised by their geometric mean and a t-interval on
the log ratio over seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate

import difflab
from bench_time_to_quality import Network, Run, diffusers_step, train_difflab, train_loop
from difflab.conditioning.base import NoConditioning
from difflab.diffusion import EpsilonPrediction, NoiseSchedule, VPrediction, get_sampler
from difflab.evaluation import RealImages, Scorer
from difflab.metrics.features import CheckDigitFeatures, DigitFeatures
from difflab.model import DiffusionModel

LRS, BATCHES = (1e-4, 3e-4, 1e-3, 2e-3), (16, 64)
UNET2D = {"layers_per_block": 1, "block_out_channels": [16, 32, 64], "norm_num_groups": 8, "attention_head_dim": 32,
          "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
          "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}


@dataclass(frozen=True)
class Cell:
    recipe: str  # difflab | diffusers | lucidrains
    network: str  # small | unet2d | lucidrains
    lr: float | None = None  # None: the recipe's default setting, as published
    batch: int | None = None

    @property
    def setting(self) -> str:
        return "default" if self.lr is None else f"lr{self.lr:g}_b{self.batch}"

    def name(self, seed: int, budget_min: float) -> str:
        return f"{self.recipe}-{self.network}-{self.setting}-s{seed}-{budget_min:g}min"


def sweep_cells() -> list[Cell]:
    """Every recipe's defaults, then each setting for every recipe in turn: a sweep cut short has tuned all alike."""
    recipes = (("diffusers", "unet2d"), ("lucidrains", "lucidrains"), ("difflab", "small"))
    cells = [Cell(recipe, network) for recipe, network in recipes]
    return cells + [Cell(recipe, network, lr, batch) for batch in BATCHES[::-1] for lr in LRS[::-1]
                    for recipe, network in recipes]


# ---- the networks ---------------------------------------------------------------------------------------------


def unet2d() -> torch.nn.Module:
    import diffusers

    return diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, **UNET2D)


def small() -> torch.nn.Module:
    """difflab's default network, as ``python train.py`` builds it for 32x32 digits (t: the DDPM step)."""
    cfg = difflab.compose("conditioning=none")
    return instantiate(cfg.network)


def call(network: torch.nn.Module):
    """How a recipe's loop calls the network: diffusers' returns ``.sample``."""
    return (lambda net, x, t: net(x, t).sample) if type(network).__name__ == "UNet2DModel" else \
        (lambda net, x, t: net(x, t))


# ---- the recipes ----------------------------------------------------------------------------------------------


def budget_schedule(optimizer, budget_s: float, warmup: int, start: list[float]):
    """Linear warm-up over ``warmup`` steps, then cosine to zero at the end of the wall-clock budget: the peers'
    schedules sized to the bench's run rather than to 100 epochs (diffusers) or constant (lucidrains)."""
    def factor(step: int) -> float:
        if not start:
            start.append(time.perf_counter())
        progress = min(1.0, (time.perf_counter() - start[0]) / budget_s)
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_diffusers(cell: Cell, budget_s: float, images: torch.Tensor, seed: int) -> Run:
    import diffusers
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    net = unet2d() if cell.network == "unet2d" else small()
    batch = cell.batch or 16
    run = Run(cell.name(seed, budget_s / 60), batch_size=batch, parameters=sum(p.numel() for p in net.parameters()))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(net.parameters(), lr=cell.lr or 1e-4, betas=(0.95, 0.999), weight_decay=1e-6,
                                  eps=1e-8)
    if cell.lr is None:  # as published: cosine over its default 100 epochs, EMA up to 0.9999
        lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500,
                                     num_training_steps=100 * (len(images) // batch))
        ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    else:  # sized to the budget: cosine to zero at its end, EMA up to 0.999 (a horizon of ~1000 of ~3000 steps)
        lr_scheduler = budget_schedule(optimizer, budget_s, 200, [])
        ema = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    shadow, forward = copy.deepcopy(net), call(net)
    step = diffusers_step(net, forward, scheduler, optimizer, lr_scheduler, ema)

    def ema_state():
        ema.copy_to(shadow.parameters())
        return shadow.state_dict()

    train_loop(run, budget_s, [1.0], images, step, ema_state, seed=seed)
    schedule = NoiseSchedule.linear()

    def pipeline(state):
        shadow.load_state_dict(state)
        return DiffusionModel(Network(shadow, forward), schedule, EpsilonPrediction(), get_sampler("ddim"),
                              NoConditioning(), image_shape=(1, 32, 32)).pipeline()

    run.pipeline = pipeline
    return run


def train_lucidrains(cell: Cell, budget_s: float, images: torch.Tensor, seed: int) -> Run:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    unet = Unet(dim=16, dim_mults=(1, 2, 4), channels=1)
    diffusion = GaussianDiffusion(unet, image_size=32, timesteps=1000)  # its defaults: pred_v, sigmoid schedule
    batch = cell.batch or 16
    run = Run(cell.name(seed, budget_s / 60), batch_size=batch, parameters=sum(p.numel() for p in unet.parameters()))
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=cell.lr or 1e-4, betas=(0.9, 0.99))
    if cell.lr is None:  # as published: constant LR, EMA 0.995 every 10 steps
        lr_scheduler, ema = None, EMA(diffusion, beta=0.995, update_every=10)
    else:  # sized to the budget
        lr_scheduler = budget_schedule(optimizer, budget_s, 200, [])
        ema = EMA(diffusion, beta=0.999, update_every=1, update_after_step=100)

    def step(clean):
        loss = diffusion((clean + 1) / 2)  # it takes [0, 1] images (auto_normalize)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad()
        ema.update()

    train_loop(run, budget_s, [1.0], images, step, lambda: ema.ema_model.model.state_dict(), seed=seed)
    schedule = NoiseSchedule(diffusion.betas.double(), name="sigmoid (lucidrains)")
    shadow = copy.deepcopy(unet)

    def pipeline(state):
        shadow.load_state_dict(state)
        return DiffusionModel(Network(shadow, lambda net, x, t: net(x, t)), schedule, VPrediction(),
                              get_sampler("ddim"), NoConditioning(), image_shape=(1, 32, 32)).pipeline()

    run.pipeline = pipeline
    return run


def train(cell: Cell, budget_s: float, images: torch.Tensor, seed: int, out: Path) -> Run:
    if cell.recipe == "difflab":
        import lightning as L

        L.seed_everything(seed, verbose=False)  # as train.py does before building
        overrides = ["conditioning=none", f"seed={seed}"]
        if cell.network == "unet2d":
            config = ",".join(f"{k}:[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}:{v}"
                              for k, v in UNET2D.items())  # Hydra's grammar: unquoted keys and names
            overrides += ["network=diffusers_unet", f"+network.config={{{config}}}"]
        if cell.lr is not None:
            overrides += [f"optim.lr={cell.lr}", f"data.batch_size={cell.batch}"]
        with tempfile.TemporaryDirectory() as runs:  # its checkpoints: the bench keeps only the EMA in memory
            return train_difflab(cell.name(seed, budget_s / 60), budget_s, [1.0], Path(runs), *overrides)
    if cell.recipe == "diffusers":
        return train_diffusers(cell, budget_s, images, seed)
    return train_lucidrains(cell, budget_s, images, seed)


# ---- scoring --------------------------------------------------------------------------------------------------


def sample(run: Run, n: int, clip: bool) -> torch.Tensor:
    """n samples in [-1, 1], seeds 0..n-1, DPM-Solver++ 20 steps; ``clip``: x0 clipped to [-1, 1] at every step."""
    made = run.pipeline(run.snapshots[max(run.snapshots)])
    pipe = made.pipeline() if isinstance(made, DiffusionModel) else made
    sampler = get_sampler("dpmpp_2m", num_steps=20, clip_sample=clip)
    return pipe(n=n, sampler=sampler, seed=list(range(n)), batch_size=250, progress=False).float().cpu() * 2 - 1


def score_run(run: Run, scorers: dict[str, Scorer], n: int, out: Path) -> dict:
    from torchvision.utils import save_image

    result = {"name": run.name, "steps": run.steps[max(run.snapshots)], "batch_size": run.batch_size,
              "parameters": run.parameters, "scores": {}}
    for clip in (False, True):
        images = sample(run, n, clip)
        if not clip:
            save_image((images[:100] + 1) / 2, out / f"{run.name}.png", nrow=10)
        for metric, scorer in scorers.items():
            figures = scorer.score([images]).sets[0]
            result["scores"][f"{metric}{'_clip' if clip else ''}"] = {
                k: v for k, v in figures.items() if k.startswith(("fid", "kid"))}
    return result


def scorers(n: int) -> dict[str, Scorer]:
    from difflab.metrics.inception import InceptionFeatures

    real = RealImages.of(difflab.compose().data, n)
    return {"digit": Scorer(DigitFeatures(), real, metrics=("fid",), bootstrap=200),
            "digit_check": Scorer(CheckDigitFeatures(), real, metrics=("fid",), bootstrap=200),
            "inception": Scorer(InceptionFeatures(), real, metrics=("fid", "kid"), bootstrap=200)}


# ---- the bench ------------------------------------------------------------------------------------------------


def contended(result: dict) -> bool:
    """Whether a run shared its machine: another process on its core (CPU time short of wall time) or busy on the
    other cores (the load average above the run's own threads). Pinning to a core does not isolate a run: on this
    2-core machine, tests on the other core cost a pinned run up to 40 % of its steps (shared caches and memory)."""
    busy = max(result["loadavg_before"][0], result["loadavg_after"][0]) > result["threads"] + 0.5
    return busy or result["cpu_s"] < 0.98 * result["wall_s"]


def run_cells(cells: list[Cell], seeds: int, budget_min: float, n: int, out: Path) -> None:
    """Train and score every (cell, seed) not yet in ``out``, interleaved: all cells at seed 0, then at seed 1...;
    a run that was ``contended`` is run again (its file overwritten)."""
    out.mkdir(parents=True, exist_ok=True)
    real = RealImages.of(difflab.compose().data, n)
    images = torch.stack([real.dataset[i]["image"] for i in range(len(real.dataset))])
    scoring = None
    for seed in range(seeds):
        for cell in cells:
            name = cell.name(seed, budget_min)
            if (out / f"{name}.json").is_file() and not contended(json.loads((out / f"{name}.json").read_text())):
                continue
            if cell.recipe == "lucidrains":
                try:
                    import denoising_diffusion_pytorch  # noqa: F401
                except ImportError:
                    print(f"{name}: denoising-diffusion-pytorch is not installed: skipped", flush=True)
                    continue
            print(f"training {name}", flush=True)
            load_before, cpu, start = os.getloadavg(), time.process_time(), time.perf_counter()
            run = train(cell, budget_min * 60, images, seed, out)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            scoring = scoring or scorers(n)
            result = {**score_run(run, scoring, n, out), "cell": cell.__dict__, "seed": seed,
                      "loadavg_during": os.getloadavg(),  # at the end of training, before scoring
                      "budget_min": budget_min, "wall_s": wall, "n": n, "threads": torch.get_num_threads(),
                      "cpu_s": cpu,
                      "cpus": sorted(os.sched_getaffinity(0)), "loadavg_before": load_before,
                      "loadavg_after": os.getloadavg(),
                      "floors": {m: s.floor() for m, s in scoring.items()}}
            (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
            print(f"  {name}: {result['steps']} steps, digit FID {result['scores']['digit']['fid']:.3f}, check "
                  f"{result['scores']['digit_check']['fid']:.3f}, Inception {result['scores']['inception']['fid']:.2f}",
                  flush=True)


def results(out: Path, budget_min: float) -> list[dict]:
    """The runs of this budget that had their core to themselves (contended ones are rerun, not reported)."""
    found = [json.loads(p.read_text()) for p in sorted(out.glob(f"*-{budget_min:g}min.json"))]
    return [r for r in found if not contended(r)]


def best(figures: dict, metric: str) -> float:
    """A run's FID on ``metric``: the better of unclipped and clipped sampling (each peer at its best)."""
    return min(figures[metric]["fid"], figures.get(f"{metric}_clip", figures[metric])["fid"])


def best_settings(out: Path, budget_min: float) -> dict[tuple[str, str], Cell]:
    """Each (recipe, network)'s sweep setting with the lowest digit FID (seed 0)."""
    chosen: dict[tuple[str, str], tuple[float, Cell]] = {}
    for r in results(out, budget_min):
        cell = Cell(**r["cell"])
        fid = best(r["scores"], "digit")
        key = (cell.recipe, cell.network)
        if key not in chosen or fid < chosen[key][0]:
            chosen[key] = (fid, cell)
    return {key: cell for key, (_, cell) in chosen.items()}


def log_ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): a 95 % t-interval on the mean log ratio over seeds (no interval with one)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), float("nan"), float("nan")
    from scipy.stats import t as student

    half = student.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def report(out: Path, budget_min: float) -> None:
    runs = results(out, budget_min)
    if not runs:
        raise SystemExit(f"no results for {budget_min:g} min in {out}")
    by_cell: dict[Cell, dict[int, dict]] = {}
    for r in runs:
        by_cell.setdefault(Cell(**r["cell"]), {})[r["seed"]] = r
    floors = runs[0]["floors"]
    print(f"{budget_min:g} min, n = {runs[0]['n']}; real-vs-real floors: digit "
          f"{floors['digit']['fid_real_vs_real']:.3f}, check {floors['digit_check']['fid_real_vs_real']:.3f}, "
          "Inception "
          f"{floors['inception']['fid_real_vs_real']:.2f}")
    metrics = ("digit", "digit_check", "inception")
    print(f"{'recipe':<11}{'network':<11}{'setting':<14}{'seeds':>5}{'steps':>7}" +
          "".join(f"{m + ' FID':>18}" for m in metrics) + f"{'Inception KID':>15}")
    reference = {seed: r for cell, seeds in by_cell.items() if (cell.recipe, cell.network, cell.lr) ==
                 ("difflab", "small", None) for seed, r in seeds.items()}
    for cell, seeds in sorted(by_cell.items(), key=lambda kv: (kv[0].recipe, kv[0].network, kv[0].setting)):
        rows = list(seeds.values())
        steps = statistics.fmean(r["steps"] for r in rows)
        shown = []
        for m in metrics:
            values = [best(r["scores"], m) for r in rows]
            shown.append(f"{statistics.fmean(values):.3f}" + (f" [{min(values):.3f}, {max(values):.3f}]"
                                                                if len(values) > 1 else ""))
        kid = statistics.fmean(min(r["scores"]["inception"]["kid"], r["scores"]["inception_clip"]["kid"])
                               for r in rows)
        print(f"{cell.recipe:<11}{cell.network:<11}{cell.setting:<14}{len(rows):>5}{steps:>7.0f}" +
              "".join(f"{s:>18}" for s in shown) + f"{kid:>15.4f}")
        paired = [s for s in seeds if s in reference]
        if reference and paired and (cell.recipe, cell.network, cell.lr) != ("difflab", "small", None):
            for m in metrics:
                ratio = log_ratio_interval([best(seeds[s]["scores"], m) / best(reference[s]["scores"], m)
                                            for s in paired])
                interval = "" if math.isnan(ratio[1]) else f" [{ratio[1]:.2f}, {ratio[2]:.2f}]"
                print(f"{'':<36}{m}: {ratio[0]:.2f}x difflab-small-default{interval} over {len(paired)} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sweep", "headline", "report"])
    parser.add_argument("--budget-min", type=float, default=None, help="default: 6 (sweep), 12 (headline, report)")
    parser.add_argument("--seeds", type=int, default=3, help="headline: training seeds per cell (sweep: 1)")
    parser.add_argument("--n", type=int, default=500, help="samples per run scored")
    parser.add_argument("--sweep-budget-min", type=float, default=6.0, help="headline: the sweep that picks the best")
    parser.add_argument("--only", default="", help="comma-separated recipes to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fair",
                        help="where the runs' JSON and sample grids go (kept in git: the tables are made from them)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(",")))
    if args.command == "sweep":
        cells = [c for c in sweep_cells() if not only or c.recipe in only]
        run_cells(cells, 1, args.budget_min or 6.0, args.n, args.out)
        report(args.out, args.budget_min or 6.0)
    elif args.command == "headline":
        cells = [Cell(r, net) for r in ("difflab", "diffusers") for net in ("small", "unet2d")]
        cells += [Cell("lucidrains", "lucidrains")]
        cells += [c for c in best_settings(args.out, args.sweep_budget_min).values() if c not in cells]
        cells = [c for c in cells if not only or c.recipe in only]
        run_cells(cells, args.seeds, args.budget_min or 12.0, args.n, args.out)
        report(args.out, args.budget_min or 12.0)
    else:
        report(args.out, args.budget_min or 12.0)


if __name__ == "__main__":
    main()
