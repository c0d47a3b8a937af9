"""Time to quality: difflab's recipe against diffusers' and lucidrains' at the same wall-clock training budget.

    python bench/bench_time_to_quality.py [--budget-min 12] [--n 500] [--peers difflab,diffusers,...]
                                          [--set OVERRIDE ...]

One after another on this machine, each for the same training wall-clock (data loading included):
  difflab         the default recipe (python train.py: class-conditional, scored class-balanced at its guidance)
  difflab_uncond  the same with conditioning=none
  diffusers       diffusers' examples/unconditional_image_generation/train_unconditional.py recipe at the default
                  network's size: UNet2DModel (16 / 32 / 64 channels, attention at 8x8 and in the middle),
                  DDPMScheduler (linear, epsilon, MSE), AdamW 1e-4 (betas 0.95 / 0.999, weight decay 1e-6), cosine
                  LR with 500 warm-up steps over its default 100 epochs, EMAModel (inv_gamma 1, power 3/4, max
                  0.9999), batch 16, gradient norm clipped to 1
  lucidrains      denoising-diffusion-pytorch (if installed): Unet(dim=16, dim_mults=(1, 2, 4)) + GaussianDiffusion
                  (its defaults: sigmoid schedule, v prediction) with its Trainer's defaults (Adam 1e-4, betas
                  0.9 / 0.99, EMA 0.995 every 10 steps, batch 16, gradient norm clipped to 1)
difflab trains without validation or sample grids (the peers make none); ``--set`` adds Hydra overrides to both
difflab runs (how docs/recipe.md's choices were measured), and a schedule over the run's time is given the budget.
Each keeps its EMA weights at the ``--marks`` (fractions of the budget); the snapshots are scored afterwards by the
digit-feature FID of n samples (bootstrap interval; the real-vs-real floor at the same n) under DPM-Solver++ 20
steps, and the final ones also under DDIM 50 steps: every model through difflab's samplers on its own schedule and
parameterisation (equal to diffusers' schedulers: tests/test_golden_diffusers.py). The peers' own default, 1000 DDPM
steps, would cost about 45 CPU-minutes per snapshot. Prints the table, FID(peer) / FID(difflab_uncond) at the
budget, and the training time difflab_uncond took to reach each peer's final FID.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

import difflab
from difflab.conditioning.base import NoConditioning
from difflab.diffusion import EpsilonPrediction, NoiseSchedule, VPrediction, get_sampler
from difflab.evaluation import RealImages, Scorer, generate, judge_correct
from difflab.metrics.classifier import load_digit_classifier
from difflab.metrics.features import DigitFeatures
from difflab.model import DiffusionModel
from difflab.training import build

PEERS = ("difflab", "difflab_uncond", "diffusers", "lucidrains")
MARKS = (1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0)


@dataclass
class Run:
    """A peer's training: EMA snapshots {training seconds: state dict}, steps at each, and what samples them."""

    name: str
    snapshots: dict[float, dict] = field(default_factory=dict)
    steps: dict[float, int] = field(default_factory=dict)
    batch_size: int = 0
    parameters: int = 0
    pipeline: object = None  # snapshot state dict -> a Pipeline (or a DiffusionModel for difflab's runs)
    scores: dict = field(default_factory=dict)


class Snapshots:
    """Keeps the EMA weights at each mark of a training-time budget; says when the budget is spent."""

    def __init__(self, run: Run, budget_s: float, marks):
        self.run, self.budget_s = run, budget_s
        self.marks = sorted(m * budget_s for m in marks)
        self.start = None

    def begin(self) -> None:
        self.start = time.perf_counter()

    def after_step(self, step: int, ema_state) -> bool:
        """Record any mark passed; True once the budget is spent."""
        elapsed = time.perf_counter() - self.start
        while self.marks and elapsed >= self.marks[0]:
            mark = self.marks.pop(0)
            self.run.snapshots[mark] = {k: v.detach().clone() for k, v in ema_state().items()}
            self.run.steps[mark] = step
            print(f"  {self.run.name}: {mark / 60:.1f} min, step {step}", flush=True)
        return not self.marks


class SnapshotCallback(L.Callback):
    def __init__(self, snapshots: Snapshots):
        self.snapshots = snapshots

    def on_train_start(self, trainer, pl_module):
        self.snapshots.begin()

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.snapshots.after_step(trainer.global_step, pl_module.ema.state_dict):
            trainer.should_stop = True


def train_difflab(name: str, budget_s: float, marks, out: Path, *overrides: str) -> Run:
    cfg = difflab.compose(f"paths.output_dir={out / name}", "trainer.max_time=null", "trainer.max_steps=1000000",
                          "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                          "~callbacks.progress_bar", "~callbacks.sample_grid", *overrides)
    if "max_time" in cfg.lr_scheduler:  # a schedule over the run's time (lr_scheduler=budget): the bench's budget
        cfg.lr_scheduler.max_time = budget_s
    model, datamodule, trainer = build(cfg)
    run = Run(name, batch_size=cfg.data.batch_size, parameters=sum(p.numel() for p in model.network.parameters()))
    trainer.callbacks.append(SnapshotCallback(Snapshots(run, budget_s, marks)))
    trainer.fit(model, datamodule=datamodule)

    def pipeline(state):
        model.ema.load_state_dict(state)
        return model.diffusion_model()

    run.pipeline = pipeline
    return run


def train_loop(run: Run, budget_s: float, marks, images: torch.Tensor, step_fn, ema_state, seed: int = 0) -> None:
    """A plain training loop over shuffled in-memory images until the budget is spent."""
    snapshots = Snapshots(run, budget_s, marks)
    g = torch.Generator().manual_seed(seed)
    step, done = 0, False
    snapshots.begin()
    while not done:
        for index in torch.randperm(len(images), generator=g).split(run.batch_size):
            if len(index) < run.batch_size:
                continue  # drop_last, as the peers' DataLoaders
            step_fn(images[index])
            step += 1
            if snapshots.after_step(step, ema_state):
                done = True
                break


class Network(nn.Module):
    """A peer's network behind difflab's interface: forward(x, t, **conditions) -> its prediction."""

    def __init__(self, network: nn.Module, call):
        super().__init__()
        self.network, self.call = network, call

    def forward(self, x, t, **_):
        return self.call(self.network, x, t)


def diffusers_step(net, forward, scheduler, optimizer, lr_scheduler, ema):
    """train_unconditional.py's training step: epsilon MSE at a uniform DDPM t, gradient norm clipped to 1, the LR
    schedule and EMA stepped after the optimizer. ``forward(net, x_t, t)`` is the network's prediction."""
    def step(clean):
        noise = torch.randn_like(clean)
        t = torch.randint(0, 1000, (clean.shape[0],))
        loss = F.mse_loss(forward(net, scheduler.add_noise(clean, noise, t), t).float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(net.parameters())

    return step


def train_diffusers(budget_s: float, marks, images: torch.Tensor) -> Run:
    import diffusers
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32, 64), norm_num_groups=8, attention_head_dim=32,
                                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    run = Run("diffusers", batch_size=16, parameters=sum(p.numel() for p in unet.parameters()))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    steps_per_epoch = len(images) // run.batch_size
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=100 * steps_per_epoch)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    shadow = copy.deepcopy(unet)
    step = diffusers_step(unet, lambda net, x, t: net(x, t).sample, scheduler, optimizer, lr_scheduler, ema)

    def ema_state():
        ema.copy_to(shadow.parameters())
        return shadow.state_dict()

    train_loop(run, budget_s, marks, images, step, ema_state)
    schedule = NoiseSchedule.linear()

    def pipeline(state):
        shadow.load_state_dict(state)
        return DiffusionModel(Network(shadow, lambda net, x, t: net(x, t).sample), schedule, EpsilonPrediction(),
                              get_sampler("ddim"), NoConditioning(), image_shape=(1, 32, 32)).pipeline()

    run.pipeline = pipeline
    return run


def train_lucidrains(budget_s: float, marks, images: torch.Tensor) -> Run:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(0)
    unet = Unet(dim=16, dim_mults=(1, 2, 4), channels=1)
    diffusion = GaussianDiffusion(unet, image_size=32, timesteps=1000)  # defaults: pred_v, sigmoid schedule
    run = Run("lucidrains", batch_size=16, parameters=sum(p.numel() for p in unet.parameters()))
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)

    def step(clean):
        loss = diffusion((clean + 1) / 2)  # it takes [0, 1] images (auto_normalize)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()

    train_loop(run, budget_s, marks, images, step, lambda: ema.ema_model.model.state_dict())
    schedule = NoiseSchedule(diffusion.betas.double(), name="sigmoid (lucidrains)")
    shadow = copy.deepcopy(unet)

    def pipeline(state):
        shadow.load_state_dict(state)
        return DiffusionModel(Network(shadow, lambda net, x, t: net(x, t)), schedule, VPrediction(),
                              get_sampler("ddim"), NoConditioning(), image_shape=(1, 32, 32)).pipeline()

    run.pipeline = pipeline
    return run


def samples(run: Run, state: dict, sampler, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n samples in [-1, 1] (and the classes asked for), seeds 0..n-1: every snapshot and peer on the same noise."""
    made = run.pipeline(state)
    if isinstance(made, DiffusionModel):
        generated = generate(made, n, sampler=sampler, progress=False)
        return generated.images, generated.labels
    images = made(n=n, sampler=sampler, seed=list(range(n)), batch_size=250, progress=False)
    return images.float().cpu() * 2 - 1, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=12.0)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--marks", default=",".join(f"{m:.4f}" for m in MARKS),
                        help="fractions of the budget at which EMA weights are kept")
    parser.add_argument("--score-all", default="difflab_uncond",
                        help="the runs whose every snapshot is scored (the others: the final one)")
    parser.add_argument("--out", default="bench_time_to_quality")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE",
                        help="Hydra overrides for both difflab runs (recipe experiments), e.g. --set optim.lr=1e-3")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget_s, marks = args.budget_min * 60, [float(m) for m in args.marks.split(",")]
    real = RealImages.of(difflab.compose().data, args.n)
    train_images = torch.stack([real.dataset[i]["image"] for i in range(len(real.dataset))])
    runs = []
    for name in args.peers.split(","):
        print(f"training {name} for {args.budget_min} min", flush=True)
        if name == "difflab":
            runs.append(train_difflab(name, budget_s, marks, out, *args.set))
        elif name == "difflab_uncond":
            runs.append(train_difflab(name, budget_s, marks, out, "conditioning=none", *args.set))
        elif name == "diffusers":
            runs.append(train_diffusers(budget_s, marks, train_images))
        elif name == "lucidrains":
            try:
                runs.append(train_lucidrains(budget_s, marks, train_images))
            except ImportError:
                print("  lucidrains: denoising-diffusion-pytorch is not installed (pip install "
                      "denoising-diffusion-pytorch): skipped")
        else:
            raise SystemExit(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")

    scorer = Scorer(DigitFeatures(), real, metrics=("fid",), bootstrap=200)
    floor = scorer.floor()["fid_real_vs_real"]
    judge = load_digit_classifier()
    score_all = set(args.score_all.split(","))
    for run in runs:
        final = max(run.snapshots)
        for mark in sorted(run.snapshots):
            chosen = [("dpmpp_2m", 20)] + ([("ddim", 50)] if mark == final else [])
            if mark != final and run.name not in score_all:
                continue
            for sampler_name, steps in chosen:
                start = time.perf_counter()
                images, labels = samples(run, run.snapshots[mark], get_sampler(sampler_name, num_steps=steps), args.n)
                seconds = time.perf_counter() - start
                correct = None if labels is None else [judge_correct(judge, images, labels)]
                result = scorer.score([images], correct).sets[0]
                result.update(step=run.steps[mark], minutes=mark / 60, sampling_s=seconds)
                run.scores[(mark, sampler_name)] = result
                accuracy = f", accuracy {result['class_accuracy']:.3f}" if labels is not None else ""
                print(f"  {run.name} {mark / 60:5.1f} min (step {run.steps[mark]}) {sampler_name}-{steps}: FID "
                      f"{result['fid']:.3f} [{result['fid_interval'][0]:.3f}, {result['fid_interval'][1]:.3f}]"
                      f"{accuracy} ({seconds:.0f} s to sample)", flush=True)
    report(runs, floor, args, out)


def report(runs: list[Run], floor: float, args, out: Path) -> None:
    print(f"\nreal-vs-real floor at n = {args.n} (digit features): FID {floor:.3f}")
    print(f"{'run':<15}{'params':>9}{'batch':>6}{'steps':>7}  {'FID dpm++20':>24}  {'FID ddim50':>24}  {'x floor':>8}")
    table = {}
    for run in runs:
        final = max(run.snapshots)
        row = {s: run.scores.get((final, s)) for s in ("dpmpp_2m", "ddim")}
        table[run.name] = {"parameters": run.parameters, "batch_size": run.batch_size, "steps": run.steps[final],
                           **{f"fid_{s}": r for s, r in row.items()},
                           "curve": [{"minutes": m / 60, "step": run.steps[m], **run.scores[(m, "dpmpp_2m")]}
                                     for m in sorted(run.snapshots) if (m, "dpmpp_2m") in run.scores]}

        def cell(r):
            return f"{r['fid']:.3f} [{r['fid_interval'][0]:.3f}, {r['fid_interval'][1]:.3f}]" if r else "-"

        print(f"{run.name:<15}{run.parameters:>9}{run.batch_size:>6}{run.steps[final]:>7}  {cell(row['dpmpp_2m']):>24}"
              f"  {cell(row['ddim']):>24}  {row['dpmpp_2m']['fid'] / floor:>8.1f}")
    ours = table.get("difflab_uncond")
    if ours is not None:
        for name, peer in table.items():
            if name.startswith("difflab"):
                continue
            target = peer["fid_dpmpp_2m"]["fid"]
            ratio = target / ours["fid_dpmpp_2m"]["fid"]
            reached = next((point for point in ours["curve"] if point["fid"] <= target), None)
            when = (f"reached it by {reached['minutes']:.1f} min ({reached['minutes'] / args.budget_min:.2f} of the "
                    "budget; the first mark at or below it)" if reached else "did not reach it within the budget")
            print(f"{name}: FID {ratio:.1f}x difflab_uncond's at {args.budget_min:g} min; difflab_uncond {when}")
    summary = {"budget_min": args.budget_min, "n": args.n, "floor_fid": floor, "runs": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
