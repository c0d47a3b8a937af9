"""Training-step and sampling-forward throughput of our UNet against diffusers' UNet2DModel, same config.

    python bench/bench_unet.py [--batch 64] [--iters 5] [--preset small]

Config: by default the issue-3 reference, channels (32, 64, 128), 2 ResBlocks per level, attention at 16x16 on
1x32x32 inputs, additive time injection, 8 channels per head; ``--preset NAME`` takes conf/network/NAME.yaml
(e.g. ``small``, the default run's network) and builds diffusers' UNet2DModel to match it: widths, ResBlocks per
level (one more on the way up in both), the levels with attention, the middle attention, channels per head, norm
groups, and FiLM as ``resnet_time_scale_shift="scale_shift"``; our model keeps the preset's memory format
(``channels_last``). diffusers' model is timed in both memory formats (NCHW, its default, and NHWC) and the
ratio taken against its faster one. Prints parameters (must agree within 10 %), FLOPs per image (torch's
FlopCounterMode), images/s and achieved GFLOPS for a training step (forward + backward + AdamW, fp32) and a
no-grad forward, and our/diffusers ratios.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from difflab.nn import UNet


def ours(**overrides) -> torch.nn.Module:
    cfg = dict(in_channels=1, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
               attention_resolutions=(2,), head_dim=8, time_injection="add", time_embedding="sinusoidal_mlp")
    cfg.update(overrides)
    return UNet(**cfg)


def theirs() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)


def preset(name: str, attention: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(our UNet of conf/network/NAME.yaml on 1x32x32 digits, diffusers' UNet2DModel of its config, the config)."""
    from diffusers import UNet2DModel
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from difflab.conf import CONFIG_DIR

    node = OmegaConf.load(f"{CONFIG_DIR}/network/{name}.yaml")
    node.in_channels = 1
    node.attention_implementation = attention
    cfg = OmegaConf.to_container(node)
    if cfg["_target_"] != "difflab.nn.UNet" or cfg["time_injection"] not in ("add", "film"):
        raise SystemExit(f"network={name}: diffusers' UNet2DModel has no equivalent (a UNet with add or film only)")
    widths = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    if cfg["head_dim"] is None and len({w // (cfg["num_heads"] or 1) for w in widths}) > 1:
        raise SystemExit(f"network={name} fixes the heads, not their width: diffusers' UNet2DModel cannot")
    head_dim = cfg["head_dim"] or widths[0] // (cfg["num_heads"] or 1)
    attention_levels = [2 ** level in cfg["attention_resolutions"] for level in range(len(widths))]
    diffusers_model = UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=widths,
        layers_per_block=cfg["num_res_blocks"],
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)],
        attention_head_dim=head_dim, norm_num_groups=cfg["norm_groups"], add_attention=cfg["mid_attention"],
        resnet_time_scale_shift="scale_shift" if cfg["time_injection"] == "film" else "default")
    return instantiate(node), diffusers_model, cfg


def call(model, x, t):
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def flops_per_image(model, x, t) -> float:
    with FlopCounterMode(display=False) as counter:
        call(model, x, t).sum().backward()
    model.zero_grad(set_to_none=True)
    train = counter.get_total_flops() / x.shape[0]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call(model, x, t)
    return train, counter.get_total_flops() / x.shape[0]


def make_step(model, x, t, train: bool):
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if train:
            loss = (call(model, x, t) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode():
                call(model, x, t)

    return step


def interleaved_images_per_s(steps: dict, batch: int, iters: int) -> dict:
    """Best-of-iters images/s per model, the models' steps taken in turn (A, B, A, B, ...) so that a change in
    the machine's speed (it is shared) affects both alike."""
    for step in steps.values():
        for _ in range(2):
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "channels_first"],
                        help="our self-attention implementation")
    parser.add_argument("--preset", default=None, help="a conf/network preset (small, tiny, ...) instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 32, 32)
    t = torch.randint(0, 1000, (args.batch,))
    if args.preset:
        mine, other, cfg = preset(args.preset, args.attention)
        models = {"difflab": mine, "diffusers": other}
        print(f"network={args.preset}: " + ", ".join(f"{k} {cfg[k]}" for k in (
            "model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "head_dim", "norm_groups",
            "time_injection", "mid_attention")))
    else:
        models = {"difflab": ours(attention_implementation=args.attention), "diffusers": theirs()}
    models["diffusers_nhwc"] = copy.deepcopy(models["diffusers"]).to(memory_format=torch.channels_last)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}x1x32x32, fp32, "
          f"our attention: {args.attention}")
    # FLOPs of the architecture, counted on diffusers' model (SDPA counted by formula); ours computes the same
    # function, and counting its hand-written attention's bmm calls would credit it with the recomputation.
    train_flops, fwd_flops = flops_per_image(models["diffusers"], x[:4], t[:4])
    for name, model in list(models.items())[:2]:
        print(f"{name:<10} params {sum(p.numel() for p in model.parameters()) / 1e6:6.3f}M")
    print(f"FLOPs per image: training step {train_flops / 1e9:.2f} G, forward {fwd_flops / 1e9:.2f} G")
    results = {}
    for mode, train, flops in (("train", True, train_flops), ("forward", False, fwd_flops)):
        for model in models.values():
            model.train(train)
        steps = {name: make_step(model, x, t, train) for name, model in models.items()}
        results[mode] = interleaved_images_per_s(steps, args.batch, args.iters)
        for name, ips in results[mode].items():
            print(f"{mode:<8} {name:<14} {ips:7.1f} img/s {ips * flops / 1e9:6.1f} GFLOPS")
    ratio = {mode: r["difflab"] / max(r["diffusers"], r["diffusers_nhwc"]) for mode, r in results.items()}
    print(f"ratio difflab / diffusers' faster format: train {ratio['train']:.2f}x, "
          f"sampling forward {ratio['forward']:.2f}x")


if __name__ == "__main__":
    main()
