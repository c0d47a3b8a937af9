"""What a GPU does with difflab's code paths: training images/s and model FLOPs utilisation (MFU) of the default
network (``small``, 1x32x32) and of DiT-B/2 on 4x32x32 latents, in fp32 and bf16 autocast, eager and
``torch.compile``d, channels_last where the network uses it, SDPA attention (flash where the GPU has it); then, with
more than one GPU, a short ``trainer=fsdp`` run of train.py. Runs unchanged anywhere: on a machine without CUDA it
runs the same loop in fp32 eager on the CPU with tiny step counts (a smoke test) and says so.

    python bench/bench_gpu.py [--steps 50] [--batch 256] [--peak-tflops 989]

MFU = achieved model FLOPs (forward + backward counted by torch's FlopCounterMode on one step) / peak FLOPs; the
peak is the card's dense bf16 figure (looked up by name for H100 / H200 / A100, or --peak-tflops); fp32 rows use
the same peak, so they read as the share of the tensor cores' bf16 rate. Prints one table; no file is written.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from difflab.nn import DiT, UNet

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity
ROOT = Path(__file__).resolve().parent.parent


def networks() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    small = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                 attention_resolutions=(4,), head_dim=32, time_injection="film", channels_last=True)
    dit_b2 = DiT(in_channels=4, patch_size=2, hidden_size=768, depth=12, head_dim=64)
    return {"small (1x32x32)": (small, (1, 32, 32)), "DiT-B/2 (4x32x32 latents)": (dit_b2, (4, 32, 32))}


def train_step(network, optimizer, x, t, dtype):
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = (network(x, t).float() - x).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flops_per_step(network, x, t) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        network(x, t).float().pow(2).mean().backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(network, shape, device, batch, steps, dtype, compiled) -> tuple[float, float]:
    """(images/s, FLOPs per step) over ``steps`` timed steps after warm-up."""
    network = network.to(device).train()
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    flops = flops_per_step(network, x, t)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    step_fn = torch.compile(network) if compiled else network
    for _ in range(3 if device.type == "cuda" else 1):
        train_step(step_fn, optimizer, x, t, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(step_fn, optimizer, x, t, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start), flops


def fsdp_run(gpus: int) -> str:
    """A 30-step trainer=fsdp run of train.py on every GPU: its wall time, or why it failed."""
    run_dir = ROOT / "outputs" / "bench_gpu_fsdp"
    command = [sys.executable, str(ROOT / "train.py"), "trainer=fsdp", f"trainer.devices={gpus}",
               "trainer.max_steps=30", "trainer.max_time=null", "trainer.enable_progress_bar=false",
               "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=30",
               "trainer.val_check_interval=1000", "ckpt_path=null"]
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "DIFFLAB_RUN_DIR": str(run_dir)}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return f"trainer=fsdp on {gpus} GPUs failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}"
    return f"trainer=fsdp on {gpus} GPUs: 30 steps of the default run in {seconds:.1f} s (with start-up)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        settings = [(dtype, compiled) for dtype in (torch.float32, torch.bfloat16) for compiled in (False, True)]
        steps, batch = args.steps, args.batch
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    else:
        name, peak, settings, steps, batch = "CPU (no CUDA: a smoke run, not a measurement)", None, \
            [(torch.float32, False)], 1, 4
    print(f"device: {name}; torch {torch.__version__}; batch {batch}, {steps} timed steps"
          + (f"; peak {peak:g} bf16 TFLOPS" if peak else ""))
    print(f"{'network':<28} {'precision':<9} {'mode':<9} {'img/s':>10} {'TFLOPS':>8} {'MFU':>6}")
    for label, (network, shape) in networks().items():
        for dtype, compiled in settings:
            try:
                rate, flops = measure(network, shape, device, batch, steps, dtype, compiled)
            except Exception as err:  # e.g. compile unavailable: say so and go on
                print(f"{label:<28} {str(dtype).removeprefix('torch.'):<9} {'compiled' if compiled else 'eager':<9} "
                      f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
                continue
            tflops = rate / batch * flops / 1e12
            mfu = f"{tflops / peak:6.1%}" if peak else "     -"
            print(f"{label:<28} {str(dtype).removeprefix('torch.'):<9} {'compiled' if compiled else 'eager':<9} "
                  f"{rate:>10.1f} {tflops:>8.2f} {mfu}")
    if cuda and torch.cuda.device_count() > 1:
        print(fsdp_run(torch.cuda.device_count()))
    else:
        print("one device: no FSDP run (trainer=fsdp is tested on 2 CPU processes in tests/test_fsdp.py)")


if __name__ == "__main__":
    main()
