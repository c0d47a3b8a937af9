"""The table of a sweep's final metrics: one row per run directory, one column per swept key and metric.

Each training writes ``metrics.json`` into its run directory when it ends (see ``write_final_metrics``).
``SweepSummary`` (a Hydra callback, in ``conf/hydra/default.yaml``) tabulates them when a multirun ends, whatever
its launcher; ``python -m difflab.cli.sweep_summary multirun/DATE/TIME`` rebuilds the table later (e.g. after a
SLURM sweep whose submitting process was gone before the jobs finished).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from difflab.files import atomic_write, write_text
from difflab.training import METRICS_FILE, write_final_metrics  # noqa: F401 (the sweep's runs write it)

log = logging.getLogger(__name__)
def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def summarize(sweep_dir: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """Write ``summary.csv`` and ``summary.md`` in ``sweep_dir`` from its runs' ``metrics.json``; return the
    columns and rows. Columns: the run directory, the keys whose values differ between runs, the step, then the
    metrics (``val/`` first). Runs without ``metrics.json`` (failed, preempted, still running) are listed as
    ``unfinished`` with the overrides Hydra recorded in their ``.hydra/overrides.yaml``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {sweep_dir}")
    runs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    records = []
    for run in runs:
        path = run / METRICS_FILE
        if path.is_file():
            record = json.loads(path.read_text())
            records.append((run, dict(map(_split, record["overrides"])), record, "done"))
        elif (run / ".hydra").is_dir() or (run / "checkpoints").is_dir():  # failed, preempted or still running
            recorded = run / ".hydra" / "overrides.yaml"
            overrides = [str(o) for o in OmegaConf.load(recorded)] if recorded.is_file() else []
            records.append((run, dict(map(_split, overrides)), {"metrics": {}}, "unfinished"))
    if not records:
        raise FileNotFoundError(f"no runs in {sweep_dir} (looked for */{METRICS_FILE})")
    keys = sorted({k for _, overrides, _, _ in records for k in overrides})
    swept = [k for k in keys if len({overrides.get(k) for _, overrides, _, _ in records}) > 1]
    metric_names = sorted({m for _, _, r, _ in records for m in r["metrics"]},
                          key=lambda m: (not m.startswith("val/"), m))
    columns = ["run", *swept, "step", *metric_names, "status"]
    rows = []
    for run, overrides, record, status in records:
        row = {"run": run.name, **{k: overrides.get(k, "") for k in swept}, "step": record.get("global_step", ""),
               "status": status}
        row.update({m: record["metrics"].get(m, "") for m in metric_names})
        rows.append(row)
    with atomic_write(sweep_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    write_text(sweep_dir / "summary.md", markdown_table(headline(columns), rows))
    finished = [(run, overrides) for run, overrides, _, status in records if status == "done"]
    if any(c.startswith("train/loss_t") for c in columns) and len(finished) > 1:
        plot_sweep_loss_by_t(sweep_dir, finished, swept)
    return columns, rows


def plot_sweep_loss_by_t(sweep_dir: Path, runs: list[tuple[Path, dict]], swept: list[str]) -> Path | None:
    """``sweep_dir/loss_by_t.png``: each run's loss by t at the end of training, coloured by the last swept key's
    value and styled by the first's (an ablation such as experiment=ablate_time); skipped without matplotlib."""
    try:
        from difflab.plots import save_figure, sweep_loss_by_t_figure

        def index(key: str) -> list[int]:
            values = list(dict.fromkeys(overrides.get(key, "") for _, overrides in runs))
            return [values.index(overrides.get(key, "")) for _, overrides in runs]

        labels = [" / ".join(overrides.get(k, "") for k in swept) or run.name for run, overrides in runs]
        figure = sweep_loss_by_t_figure([run for run, _ in runs], labels,
                                        colors=index(swept[-1]) if swept else None,
                                        linestyles=index(swept[0]) if len(swept) > 1 else None,
                                        title=f"{sweep_dir.name}: {' x '.join(swept)}")
        return save_figure(figure, sweep_dir / "loss_by_t.png")
    except (ImportError, ValueError, FileNotFoundError) as err:  # no plot extra, or runs without a CSV log
        log.warning(f"no loss-by-t plot: {err}")
        return None


def headline(columns: list[str]) -> list[str]:
    """The columns a reader compares first: all but the per-bucket losses, learning rates and gradient norm, and the
    bounds of intervals, which are shown in their figure's cell (all stay in summary.csv)."""
    return [c for c in columns if not (c.startswith(("train/loss_t", "lr-")) or c == "train/grad_norm"
                                       or c.endswith(("_low", "_high")) and c.rpartition("_")[0] in columns)]


def _cell(row: dict, column: str) -> str:
    value = row[column]
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    low, high = row.get(f"{column}_low"), row.get(f"{column}_high")
    if isinstance(low, float) and isinstance(high, float):  # a figure with its interval (e.g. val/fid_1k)
        text += f" [{low:.4g}, {high:.4g}]"
    return text


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write and print the table of its runs' final metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            columns, rows = summarize(sweep_dir)
        except FileNotFoundError as err:  # e.g. every job failed: their errors were already reported
            log.warning(f"no sweep summary: {err}")
            return
        log.info(f"sweep summary (all columns: {sweep_dir / 'summary.csv'}):\n"
                 f"{markdown_table(headline(columns), rows)}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m difflab.cli.sweep_summary SWEEP_DIR  (e.g. multirun/2026-11-24/10-00-00)")
    try:
        columns, rows = summarize(argv[0])
    except FileNotFoundError as err:
        sys.exit(str(err))
    print(markdown_table(headline(columns), rows), end="")
    written = [Path(argv[0]) / name for name in ("summary.csv", "summary.md", "loss_by_t.png")]
    print("written: " + ", ".join(str(p) for p in written if p.is_file()))


if __name__ == "__main__":
    main()
