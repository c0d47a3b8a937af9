"""Plot logged metrics of one run or a sweep against the training step, from each run's CSV logger (metrics.csv):
a thin command line over ``difflab.plots.plot_metric`` and ``plot_loss_by_t``.

    python bench/plot_metrics.py RUN_DIR [RUN_DIR ...] [--metrics val/fid_500 val/loss] [--labels A B]
                                 [--out docs/images/fid_over_training.png]
    python bench/plot_metrics.py RUN_DIR [RUN_DIR ...] --loss-by-t [--window 5] [--out loss_by_t.png]

Needs matplotlib: pip install "difflab[plot]".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.plots import plot_loss_by_t, plot_metric, read_metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="a run directory or its metrics.csv")
    parser.add_argument("--metrics", nargs="+", default=["val/fid_500", "val/loss"], help="a panel each")
    parser.add_argument("--labels", nargs="+", help="one per RUN_DIR (default: the directory names)")
    parser.add_argument("--loss-by-t", action="store_true",
                        help="plot the per-range-of-t training losses train/loss_t<k> instead of --metrics")
    parser.add_argument("--window", type=int, default=5, help="--loss-by-t: logged values averaged at start and end")
    parser.add_argument("--log-y", action="store_true", help="logarithmic metric axis (--metrics)")
    parser.add_argument("--out", type=Path, default=None, help="PNG (default: metrics.png or loss_by_t.png)")
    args = parser.parse_args(argv)
    try:
        if args.loss_by_t:
            out = plot_loss_by_t(args.run_dirs, args.out or Path("loss_by_t.png"), window=args.window,
                                 labels=args.labels)
        else:
            out = plot_metric(args.run_dirs, args.metrics, args.out or Path("metrics.png"), labels=args.labels,
                              log_y=args.log_y)
            for i, run_dir in enumerate(args.run_dirs):
                series = read_metrics(run_dir)
                prefix = f"{args.labels[i] if args.labels else run_dir}\t" if len(args.run_dirs) > 1 else ""
                for key in args.metrics:
                    for step, value in series[key]:
                        print(f"{prefix}{key}\t{step}\t{value:.6g}")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
