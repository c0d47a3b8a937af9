"""Training images/s of the default config through Lightning against the bare training step, same run.

    python bench/bench_train.py [--steps 30] [--warmup 5] [overrides ...]

Both paths do the same work per step: the condition (class labels, 10 % dropped), draw t and noise, loss,
backward, gradient clipping, AdamW, LR scheduler and EMA update; Lightning adds its loop, logging (CSV) and
hooks. Validation, checkpoints and sample grids are off in both. Target: Lightning overhead <= 10 %.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from difflab.conf import CONFIG_DIR
from difflab.diffusion.guidance import Conditioned
from difflab.training import build


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        self.end = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp()
    overrides = [f"paths.output_dir={tmp}", f"trainer.max_steps={args.steps + args.warmup}",
                 "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.max_time=null",
                 *args.overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.callbacks = {}  # no checkpoints, sample grids or progress bar in either path

    def bare_loop() -> float:
        torch.manual_seed(0)
        model, datamodule, _ = build(cfg)
        optimizers = model.configure_optimizers()
        optimizer, scheduler = (optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]) \
            if isinstance(optimizers, dict) else (optimizers, None)
        loader = datamodule.train_dataloader()
        batches = iter(loader)
        start = None
        for step in range(args.steps + args.warmup):
            if step == args.warmup:
                start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            condition = model.conditioner.training_condition(batch)
            loss = model.loss(Conditioned(model.network, condition), batch["image"], model.schedule).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.network.parameters(), cfg.trainer.gradient_clip_val)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            model.update_ema()
        return args.steps * batch_size / (time.perf_counter() - start)

    batch_size = cfg.data.batch_size
    bare = bare_loop()

    # Lightning
    torch.manual_seed(0)
    model, datamodule, trainer = build(cfg)
    timer = StepTimer(args.warmup)
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=datamodule)
    lightning = args.steps * batch_size / (timer.end - timer.start)
    bare = max(bare, bare_loop())  # bare before and after Lightning: the better of two, against order effects
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default config, batch {batch_size}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"bare step: {bare:.1f} img/s   Lightning: {lightning:.1f} img/s   overhead {bare / lightning - 1:+.1%}")


if __name__ == "__main__":
    main()
