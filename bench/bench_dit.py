"""Training-step and sampling-forward throughput of our DiT against diffusers' DiTTransformer2DModel, same config.

    python bench/bench_dit.py [--batch 64] [--iters 5] [--preset dit_s]

Config: the preset's (network=dit_s: 1x32x32 MNIST, patch 4, hidden 128, 8 blocks of 4 heads of 32), class-
conditional through adaLN-Zero, fp32. Prints parameters, FLOPs per image, images/s of a training step (forward +
backward + AdamW) and of a no-grad forward, taken in turn, and our/diffusers ratios. diffusers' count is larger:
each of its blocks carries its own timestep and label embedders, where DiT (and ours) shares one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from bench_unet import interleaved_images_per_s

CONF = Path(__file__).resolve().parents[1] / "src" / "difflab" / "conf" / "network"


def ours(preset: str, channels: int) -> torch.nn.Module:
    root = OmegaConf.create({"data": {"channels": channels}, "network": OmegaConf.load(CONF / f"{preset}.yaml")})
    return instantiate(root.network, num_classes=10)


def theirs(net) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    heads = net.blocks[0].attn.heads
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=net.hidden_size // heads,
                                 in_channels=net.in_channels, num_layers=len(net.blocks), sample_size=32,
                                 patch_size=net.patch_size, num_embeds_ada_norm=10)


def call(model, x, t, y):
    if hasattr(model, "config"):  # diffusers
        return model(x, timestep=t, class_labels=y).sample
    return model(x, t, class_labels=y)


def make_step(model, x, t, y, train: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if train:
            loss = (call(model, x, t, y) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode():
                call(model, x, t, y)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--preset", default="dit_s", help="a conf/network DiT preset")
    parser.add_argument("--channels", type=int, default=1, help="image channels (dit_b: its latents' 4, fixed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = ours(args.preset, args.channels)
    size = 32
    x = torch.randn(args.batch, net.in_channels, size, size)
    t = torch.randint(0, 1000, (args.batch,))
    y = torch.randint(0, 10, (args.batch,))
    models = {"difflab": net, "diffusers": theirs(net)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"batch {args.batch}x{net.in_channels}x{size}x{size}, patch {net.patch_size}, fp32")
    with FlopCounterMode(display=False) as counter:  # counted on ours; both compute the same architecture
        call(net, x[:4], t[:4], y[:4]).sum().backward()
    net.zero_grad(set_to_none=True)
    train_flops = counter.get_total_flops() / 4
    for name, model in models.items():
        print(f"{name:<10} params {sum(p.numel() for p in model.parameters()) / 1e6:7.3f}M")
    print(f"FLOPs per image: training step {train_flops / 1e9:.3f} G")
    results = {}
    for mode, train in (("train", True), ("forward", False)):
        for model in models.values():
            model.train(train)
        steps = {name: make_step(model, x, t, y, train) for name, model in models.items()}
        results[mode] = interleaved_images_per_s(steps, args.batch, args.iters)
        for name, ips in results[mode].items():
            print(f"{mode:<8} {name:<10} {ips:7.1f} img/s")
    ratio = {mode: r["difflab"] / r["diffusers"] for mode, r in results.items()}
    print(f"ratio difflab/diffusers: train {ratio['train']:.2f}x, sampling forward {ratio['forward']:.2f}x")


if __name__ == "__main__":
    main()
