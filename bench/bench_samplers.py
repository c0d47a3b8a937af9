"""Sampler overhead per step (network calls excluded) as a fraction of one network forward.

    python bench/bench_samplers.py [--batch 64] [--steps 50] [--repeats 3]

The network is a 3-layer conv net (1 -> 64 -> 64 -> 1 channels, 3x3) on (batch, 1, 32, 32) until the
UNet exists; both are timed in the same run. Target: overhead <= 2 % of a forward.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from difflab.diffusion import SAMPLERS, NoiseSchedule, get_sampler


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(64, 1, 3, padding=1)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = conv_net()
    schedule = NoiseSchedule.linear()
    x_T = torch.randn(args.batch, 1, 32, 32)
    model_seconds = [0.0]

    def model_fn(x, t):
        start = time.perf_counter()
        out = net(x)
        model_seconds[0] += time.perf_counter() - start
        return out

    with torch.inference_mode():
        for _ in range(3):  # warm-up
            net(x_T)
        start = time.perf_counter()
        for _ in range(20):
            net(x_T)
        forward = (time.perf_counter() - start) / 20
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}x1x32x32")
        print(f"network forward (3-layer conv net): {forward * 1e3:.2f} ms")
        print(f"{'sampler':<10} {'steps':>5} {'calls':>5} {'overhead/step':>14} {'vs forward':>10}")
        for name in SAMPLERS:
            sampler = get_sampler(name, schedule, num_steps=args.steps)
            best = float("inf")
            calls = 2 * args.steps - 1 if name == "heun" else args.steps
            for _ in range(args.repeats):
                model_seconds[0] = 0.0
                start = time.perf_counter()
                sampler.sample(model_fn, x_T, generator=torch.Generator().manual_seed(0))
                best = min(best, (time.perf_counter() - start - model_seconds[0]) / args.steps)
            print(f"{name:<10} {args.steps:>5} {calls:>5} {best * 1e3:>11.3f} ms {best / forward:>9.2%}")


if __name__ == "__main__":
    main()
