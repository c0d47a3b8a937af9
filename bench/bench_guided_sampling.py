"""Wall time of n class-balanced guided samples of a checkpoint: fewer-step solvers against DDIM 50, same run.

    python bench/bench_guided_sampling.py CKPT [--n 500] [--settings ddim:50,unipc:12,dpmpp_2m:20]

Each setting draws the same n samples (one seed per sample, the classes in turn, the checkpoint's guidance; the
conditional and unconditional passes batched together by the pipeline) and prints its seconds and its ratio to
the first setting. Whether a setting keeps DDIM 50's quality is evaluate.py's to say (paired FID difference):
    python evaluate.py ckpt=CKPT "compare=[{sampler:ddim,steps:50},{sampler:unipc,steps:12}]" n=500
"""

from __future__ import annotations

import argparse
import time

import difflab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--settings", default="ddim:50,unipc:12,dpmpp_2m:20")
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()
    pipe = difflab.load(args.ckpt, device="cpu")
    condition = pipe.conditioner.examples(args.n, pipe.device)  # class-balanced, as evaluate.py's samples
    seconds = {}
    for setting in args.settings.split(","):
        sampler, steps = setting.split(":")
        start = time.perf_counter()
        pipe(condition=condition or None, n=None if condition else args.n, sampler=sampler, steps=int(steps),
             seed=list(range(args.n)), batch_size=args.batch_size, progress=False)
        seconds[setting] = time.perf_counter() - start
        first = next(iter(seconds.values()))
        print(f"{sampler} {steps} steps: {seconds[setting]:.1f} s for {args.n} samples, "
              f"{seconds[setting] / first:.2f}x the first setting's time", flush=True)


if __name__ == "__main__":
    main()
