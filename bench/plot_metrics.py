"""Plot logged metrics of a run against the training step, from its CSV logger's metrics.csv.

    python bench/plot_metrics.py RUN_DIR [--metrics val/fid_500 val/loss] [--out docs/images/fid_over_training.png]

Needs matplotlib (not a dependency of difflab: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    if not rows:
        raise ValueError(f"{run_dir / 'csv' / 'metrics.csv'} has no values of {key!r}")
    return [s for s, _ in rows], [v for _, v in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--metrics", nargs="+", default=["val/fid_500", "val/loss"])
    parser.add_argument("--out", type=Path, default=Path("metrics.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.metrics), figsize=(4 * len(args.metrics), 3), squeeze=False)
    for ax, key in zip(axes[0], args.metrics, strict=True):
        steps, values = series(args.run_dir, key)
        ax.plot(steps, values, marker="o")
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        for step, value in zip(steps, values, strict=True):
            print(f"{key}\t{step}\t{value:.6g}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
