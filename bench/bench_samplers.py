"""Sampler overhead per step (network calls excluded) as a fraction of one network forward.

    python bench/bench_samplers.py [--network small|conv] [--batch 64] [--steps 20] [--repeats 2]

The network is the ``small`` UNet preset (conf/network/small.yaml) or a 3-layer conv net
(1 -> 64 -> 64 -> 1 channels, 3x3) on (batch, 1, 32, 32); sampler and network are timed in the same run.
Target: overhead <= 2 % of a forward.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from difflab.diffusion import Denoiser, NoiseSchedule, available_samplers, get_sampler

SMALL_UNET = Path(__file__).resolve().parents[1] / "src" / "difflab" / "conf" / "network" / "small.yaml"


class ConvNet(nn.Sequential):
    def forward(self, x, t):
        return super().forward(x)


def conv_net() -> nn.Module:
    return ConvNet(nn.Conv2d(1, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(64, 1, 3, padding=1)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=["small", "conv"], default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = instantiate(OmegaConf.load(SMALL_UNET)).eval() if args.network == "small" else conv_net()
    label = "UNet 'small' preset" if args.network == "small" else "3-layer conv net"
    schedule = NoiseSchedule.linear()
    x_T = torch.randn(args.batch, 1, 32, 32)
    model_seconds = [0.0]
    t0 = torch.full((args.batch,), 500)

    def model_fn(x, t):
        start = time.perf_counter()
        out = net(x, t)
        model_seconds[0] += time.perf_counter() - start
        return out

    with torch.inference_mode():
        for _ in range(3):  # warm-up
            model_fn(x_T, t0)
        start = time.perf_counter()
        for _ in range(10):
            model_fn(x_T, t0)
        forward = (time.perf_counter() - start) / 10
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}x1x32x32")
        print(f"network forward ({label}): {forward * 1e3:.2f} ms")
        print(f"{'sampler':<10} {'steps':>5} {'calls':>5} {'overhead/step':>14} {'per call vs forward':>20}")
        denoiser = Denoiser(model_fn, schedule, "epsilon")
        for name in available_samplers():
            sampler = get_sampler(name, num_steps=args.steps)
            best = float("inf")
            calls = 2 * args.steps - 1 if name == "heun" else args.steps  # heun's last step is Euler
            for _ in range(args.repeats):
                model_seconds[0] = 0.0
                start = time.perf_counter()
                sampler.sample(denoiser, x_T, generator=torch.Generator().manual_seed(0))
                best = min(best, time.perf_counter() - start - model_seconds[0])
            per_step, per_call = best / args.steps, best / calls
            print(f"{name:<10} {args.steps:>5} {calls:>5} {per_step * 1e3:>11.3f} ms {per_call / forward:>19.2%}")


if __name__ == "__main__":
    main()
