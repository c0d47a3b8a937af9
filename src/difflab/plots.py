"""Figures of evaluation results, training curves and noise schedules (matplotlib, the ``plot`` extra): drawn to PNG
files, for docs and dashboards."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from difflab.extras import require
from difflab.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from difflab.diffusion.schedules import NoiseSchedule


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, error) that no other point beats on both (no more cost and no more error, and
    less of one), sorted by cost."""
    front = [i for i, (c, e) in enumerate(points)
             if not any(c2 <= c and e2 <= e and (c2, e2) != (c, e) for c2, e2 in points)]
    return sorted(front, key=lambda i: points[i])


def plot_quality_cost(rows: Sequence[dict], path: str | Path, metric: str = "fid", title: str = "",
                      floor: float | None = None) -> Path:
    """``metric`` (with its ``<metric>_interval`` as error bars) against network evaluations per sample (``nfe``),
    one line per ``sampler``, the Pareto front circled and joined, ``floor`` (the real-vs-real value) dashed; both
    axes logarithmic, as a few poor settings would otherwise flatten the rest."""
    require("matplotlib", "plot", "the quality-cost plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for sampler in dict.fromkeys(row["sampler"] for row in rows):
        own = sorted((row for row in rows if row["sampler"] == sampler), key=lambda row: row["nfe"])
        values = [row[metric] for row in own]
        errors = [[v - row.get(f"{metric}_interval", (v, v))[0] for v, row in zip(values, own, strict=True)],
                  [row.get(f"{metric}_interval", (v, v))[1] - v for v, row in zip(values, own, strict=True)]]
        ax.errorbar([row["nfe"] for row in own], values, yerr=errors, marker="o", capsize=3, label=sampler)
    front = [rows[i] for i in pareto_front([(row["nfe"], row[metric]) for row in rows])]
    ax.plot([row["nfe"] for row in front], [row[metric] for row in front], color="black", linestyle=":",
            marker="o", markersize=12, markerfacecolor="none", label="Pareto front")
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle="--", label=f"real vs real ({floor:.3g})")
    ax.set_xscale("log")
    ax.set_yscale("log", nonpositive="clip")
    ticks = []
    for value in sorted({row["nfe"] for row in rows}):  # labels far enough apart to be read
        if not ticks or value >= 1.25 * ticks[-1]:
            ticks.append(value)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("network evaluations per sample (log scale)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


# ---- training curves, from a run's CSV logger ---------------------------------------------------------------------

Series = dict[str, list[tuple[int, float]]]  # metric -> [(step, value), ...], sorted by step
Run = str | Path | Mapping[str, Sequence[tuple[int, float]]]  # a run dir, its metrics.csv, or read_metrics' output
_LOSS_BUCKET = re.compile(r"train/loss_t(\d+)")  # DiffusionModule's per-range-of-t training losses


def metrics_csv(run_dir_or_csv: str | Path) -> Path:
    """The CSV logger's file of a run directory (``<run dir>/csv/metrics.csv``); a file path is returned as is."""
    path = Path(run_dir_or_csv)
    return path / "csv" / "metrics.csv" if path.is_dir() else path


def read_metrics(run_dir_or_csv: str | Path) -> Series:
    """A run's logged metrics as ``{metric: [(step, value), ...]}`` sorted by step, blank cells and NaNs dropped, from
    Lightning's CSVLogger format (a ``step`` column and one per metric, blank where a row did not log it, as each
    ``log_metrics`` call writes its own row). A step written twice (a run resumed from an earlier checkpoint appends
    to the same file) keeps its last value, the one the resumed run's curve continues from."""
    path = metrics_csv(run_dir_or_csv)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (expected a run directory with csv/metrics.csv)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names = [name for name in reader.fieldnames or [] if name != "step"]
        if "step" not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no 'step' column: not a Lightning CSVLogger metrics file")
        by_step: dict[str, dict[int, float]] = {name: {} for name in names}
        for row in reader:
            if not row["step"]:
                continue
            step = int(float(row["step"]))
            for name in names:
                if row.get(name) and not math.isnan(value := float(row[name])):
                    by_step[name][step] = value
    return {name: sorted(values.items()) for name, values in by_step.items() if values}


def metric_figure(runs: Run | Sequence[Run], metrics: str | Sequence[str], *, labels: Sequence[str] | None = None,
                  title: str = "", log_y: bool = False) -> Figure:
    """Each of ``metrics`` (a panel each) over training steps, a line per run (a sweep), shaded between
    ``<metric>_low`` and ``<metric>_high`` where logged (FID's bootstrap interval); the Figure, for a notebook."""
    runs = _load_runs(runs, labels)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    fig = _figure(4.8 * len(metrics), 3.6)
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        for label, series in runs:
            steps, values = _columns(_values(series, metric, label))
            (line,) = ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)
            if f"{metric}_low" in series and f"{metric}_high" in series:
                high = dict(series[f"{metric}_high"])
                bounds = [(s, low, high[s]) for s, low in series[f"{metric}_low"] if s in high]
                ax.fill_between([s for s, _, _ in bounds], [lo for _, lo, _ in bounds], [hi for _, _, hi in bounds],
                                color=line.get_color(), alpha=0.2, linewidth=0,
                                label="interval (_low, _high)" if len(runs) == 1 else None)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if len(runs) > 1 or ax.collections:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_metric(runs: Run | Sequence[Run], metrics: str | Sequence[str], path: str | Path, *,
                labels: Sequence[str] | None = None, title: str = "", log_y: bool = False) -> Path:
    """``metric_figure`` written to the PNG ``path``: a run's or a sweep's curves of ``train/loss``, ``val/fid_1k``,
    ...; returns ``path``."""
    return save_figure(metric_figure(runs, metrics, labels=labels, title=title, log_y=log_y), path)


def loss_by_t_figure(runs: Run | Sequence[Run], *, window: int = 5, labels: Sequence[str] | None = None,
                     title: str = "", log_y: bool = True) -> Figure:
    """The per-bucket training losses ``train/loss_t<k>`` (k-th of equal ranges of t): (a) each bucket's loss over
    the steps of the first run, coloured from low to high t, and (b) the loss against t at the start and at the end
    of training (mean of each bucket's first and last ``window`` logged values), a colour per run (an ablation):
    which noise levels the network learns, and which it has not yet."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm

    runs = _load_runs(runs, labels)
    fig = _figure(11, 4)
    over_steps, by_t = fig.subplots(1, 2)
    label, series = runs[0]
    buckets = _loss_buckets(series, label)
    count = max(buckets) + 1
    cmap = matplotlib.colormaps["viridis"]
    norm = BoundaryNorm([k / count for k in range(count + 1)], cmap.N)
    for k, name in buckets.items():
        steps, values = _columns(series[name])
        over_steps.plot(steps, values, color=cmap(norm((k + 0.5) / count)), linewidth=1)
    fig.colorbar(ScalarMappable(norm, cmap), ax=over_steps, label="t / T (bucket)")
    over_steps.set_title(f"(a) loss per range of t over training{f': {label}' if len(runs) > 1 else ''}")
    over_steps.set_xlabel("optimizer step")
    for i, (label, series) in enumerate(runs):
        buckets = _loss_buckets(series, label)
        centres = [(k + 0.5) / count for k in buckets]
        start, end = [], []
        for name in buckets.values():
            values = [v for _, v in series[name]]
            w = max(1, min(window, len(values) // 2))  # start and end never share a value
            start.append(sum(values[:w]) / w)
            end.append(sum(values[-w:]) / w)
        prefix = f"{label}: " if len(runs) > 1 else ""
        by_t.plot(centres, start, color=f"C{i}", linestyle="--", marker="o", markersize=3, alpha=0.6,
                  label=f"{prefix}start (first {window} logs)")
        by_t.plot(centres, end, color=f"C{i}", marker="o", markersize=3, label=f"{prefix}end (last {window} logs)")
    by_t.set_title("(b) loss by t, start vs end of training")
    by_t.set_xlabel("t / T (bucket centre)")
    by_t.set_xlim(0, 1)
    by_t.legend(fontsize="small")
    for ax in (over_steps, by_t):
        ax.set_ylabel("training loss" + (" (log scale)" if log_y else ""))
        if log_y:  # the loss spans decades over t (an eps-prediction's is tiny near t = T)
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    return fig


def plot_loss_by_t(runs: Run | Sequence[Run], path: str | Path, *, window: int = 5,
                   labels: Sequence[str] | None = None, title: str = "", log_y: bool = True) -> Path:
    """``loss_by_t_figure`` written to the PNG ``path``; returns ``path``."""
    return save_figure(loss_by_t_figure(runs, window=window, labels=labels, title=title, log_y=log_y), path)


def final_loss_by_t(series: Series, label: str, window: int = 10) -> tuple[list[float], list[float]]:
    """(bucket centres as t / T, the mean of each bucket's last ``window`` logged losses) of one run."""
    buckets = _loss_buckets(series, label)
    count = max(buckets) + 1
    ends = []
    for name in buckets.values():
        values = [v for _, v in series[name]][-window:]
        ends.append(sum(values) / len(values))
    return [(k + 0.5) / count for k in buckets], ends


def sweep_loss_by_t_figure(runs: Sequence[Run], labels: Sequence[str], *, colors: Sequence[int] | None = None,
                           linestyles: Sequence[int] | None = None, window: int = 10, title: str = "") -> Figure:
    """An ablation's runs side by side: (a) each run's loss by t at the end of training (last ``window`` logs per
    bucket) and (b) its ratio to the median over the runs in each bucket, which shows the differences that the loss's
    decades over t hide. ``colors`` / ``linestyles``: an index per run (e.g. by injection and by embedding)."""
    import torch

    loaded = _load_runs(runs, labels)
    curves = [final_loss_by_t(series, label, window) for label, series in loaded]
    median = torch.tensor([ends for _, ends in curves]).median(dim=0).values
    fig = _figure(12, 4.5)
    absolute, relative = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for i, ((label, _), (centres, ends)) in enumerate(zip(loaded, curves, strict=True)):
        style = dict(color=f"C{colors[i] if colors else i}", marker="o", markersize=3,
                     linestyle=styles[(linestyles[i] if linestyles else 0) % len(styles)], label=label)
        absolute.plot(centres, ends, **style)
        relative.plot(centres, (torch.tensor(ends) / median).tolist(), **style)
    absolute.set_yscale("log")
    absolute.set_ylabel(f"training loss, last {window} logs (log scale)")
    absolute.set_title("(a) loss by t at the end of training")
    relative.axhline(1.0, color="grey", linewidth=0.8)
    relative.set_ylabel("loss / median over the runs")
    relative.set_title("(b) relative to the sweep's median per range of t")
    for ax in (absolute, relative):
        ax.set_xlabel("t / T (bucket centre)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3, which="both")
    relative.legend(fontsize="x-small", ncol=2)
    if title:
        fig.suptitle(title)
    return fig


# ---- noise schedules ----------------------------------------------------------------------------------------------

def schedules_figure(schedules: Sequence[str | NoiseSchedule], *, num_timesteps: int = 1000) -> Figure:
    """alpha_bar, SNR (log scale) and log-SNR against t for each schedule (a name in conf/schedule, or a
    ``NoiseSchedule``): how each spreads the noise levels over the steps, the log-SNR being what losses and
    samplers weigh by."""
    import torch

    from difflab.diffusion.schedules import NoiseSchedule

    fig = _figure(13, 3.8)
    alpha_bar_ax, snr_ax, log_snr_ax = fig.subplots(1, 3)
    for entry in schedules:
        schedule = NoiseSchedule.from_name(entry, num_timesteps) if isinstance(entry, str) else entry
        label = schedule.name + (" (zero terminal SNR)" if schedule.zero_terminal_snr else "")
        t = range(schedule.num_timesteps)
        alpha_bar_ax.plot(t, schedule.alphas_cumprod.numpy(), label=label)
        snr_ax.plot(t, schedule.snr.numpy(), label=label)
        log_snr_ax.plot(t, torch.log(schedule.snr).numpy(), label=label)  # -inf at a zero terminal SNR: not drawn
    snr_ax.set_yscale("log", nonpositive="mask")
    for ax, name in ((alpha_bar_ax, "alpha_bar"), (snr_ax, "SNR = alpha_bar / (1 - alpha_bar) (log scale)"),
                     (log_snr_ax, "log-SNR")):
        ax.set_title(name)
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3, which="major")
    alpha_bar_ax.legend(fontsize="small")
    return fig


def plot_schedules(schedules: Sequence[str | NoiseSchedule], path: str | Path, *, num_timesteps: int = 1000) -> Path:
    """``schedules_figure`` written to the PNG ``path`` (``options("schedule")`` for every schedule); returns
    ``path``."""
    return save_figure(schedules_figure(schedules, num_timesteps=num_timesteps), path)


# ---- probes (difflab.probe) ----------------------------------------------------------------------------------------

def t_response_figure(result, *, title: str = "") -> Figure:
    """Left: each block's relative change of activations against the timestep the network is told (input fixed at
    the reference t), as a heat-map (blocks top to bottom in forward order); right: each block's spread over t."""
    import numpy as np

    fig = _figure(12, 0.28 * len(result.blocks) + 1.8)
    heat_ax, bar_ax = fig.subplots(1, 2, width_ratios=(3, 1), sharey=True)
    image = heat_ax.imshow(result.change.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    heat_ax.set_xticks(range(len(result.timesteps)), [str(t) for t in result.timesteps], fontsize="small")
    heat_ax.set_yticks(range(len(result.blocks)), result.blocks, fontsize="small")
    heat_ax.set_xlabel(f"timestep told to the network (input noised to t = {result.reference_t})")
    heat_ax.set_title("||h(t) - h(t_ref)|| / ||h(t_ref)||")
    fig.colorbar(image, ax=heat_ax, fraction=0.04)
    bar_ax.barh(np.arange(len(result.blocks)), result.spread.numpy(), color="tab:blue")
    bar_ax.set_xlabel("spread over t")
    bar_ax.grid(alpha=0.3, axis="x")
    setting = ", ".join(s for s in (result.time_embedding, result.time_injection) if s)
    fig.suptitle(title or f"response to t ({setting})" if setting or title else "response to t")
    return fig


def guidance_gap_figure(results, *, labels: Sequence[str] | None = None, title: str = "") -> Figure:
    """The guidance gap ||eps(x_t, c) - eps(x_t, null)|| (root-mean-square) against t, one line per result."""
    results = list(results) if isinstance(results, (list, tuple)) else [results]
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    for i, result in enumerate(results):
        ax.plot(result.timesteps, result.gap.numpy(), marker="o", label=labels[i] if labels else None)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("rms of eps(x_t, c) - eps(x_t, null)")
    ax.set_title(title or "guidance gap")
    ax.grid(alpha=0.3)
    if labels:
        ax.legend()
    return fig


def cross_attention_figure(result, *, title: str = "") -> Figure:
    """One row per prompt: the image probed, then the attention map of each of its tokens."""
    columns = 1 + max(len(tokens) for tokens in result.tokens)
    fig = _figure(1.5 * columns, 1.7 * len(result.prompts))
    axes = fig.subplots(len(result.prompts), columns, squeeze=False)
    for row, (image, tokens, maps) in enumerate(zip(result.images, result.tokens, result.maps, strict=True)):
        shown = image.permute(1, 2, 0).clamp(0, 1).numpy()
        axes[row, 0].imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_title(result.prompts[row], fontsize="small")
        for col in range(1, columns):
            ax = axes[row, col]
            if col <= len(tokens):
                ax.imshow(maps[col - 1].numpy(), cmap="inferno", vmin=0, vmax=float(maps.max()))
                ax.set_title(tokens[col - 1], fontsize="small")
        for ax in axes[row]:
            ax.set_axis_off()
    fig.suptitle(title or "cross-attention per token (averaged over heads, layers and t)")
    return fig


def bayes_gap_figure(result, *, title: str = "") -> Figure:
    """Per range of t: the network's loss and the Bayes-optimal loss (log scale), and the excess between them."""
    fig = _figure(11, 3.8)
    loss_ax, excess_ax = fig.subplots(1, 2)
    centres = [(result.edges[k] + result.edges[k + 1] - 1) / 2 for k in range(len(result.loss))]
    loss_ax.plot(centres, result.loss.numpy(), marker="o", label="network")
    loss_ax.plot(centres, result.bayes.numpy(), marker="o", linestyle="--", label="Bayes-optimal")
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel(f"mean squared error ({result.prediction})")
    loss_ax.legend()
    excess_ax.bar(centres, result.excess.numpy(), width=0.8 * (result.edges[1] - result.edges[0]))
    excess_ax.set_ylabel("excess over the Bayes loss")
    for ax in (loss_ax, excess_ax):
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "loss against the Bayes-optimal loss (data=gmm)")
    return fig


# ---- helpers ------------------------------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure:
    """An empty figure drawn by Agg, outside pyplot: nothing to close, and a notebook's backend is left alone."""
    require("matplotlib", "plot", "difflab.plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` (any of this module's figures) to the PNG ``path`` atomically (a dashboard never shows half a
    PNG); returns ``path``."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120)
    return path


def figure_pixels(fig: Figure):
    """The figure drawn as a (3, H, W) float tensor in [0, 1], for loggers that take images."""
    import numpy as np
    import torch

    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def _load_runs(runs: Run | Sequence[Run], labels: Sequence[str] | None) -> list[tuple[str, Series]]:
    """(label, series) per run; a run is labelled by ``labels`` or else its directory's name."""
    runs = [runs] if isinstance(runs, (str, Path, Mapping)) else list(runs)
    if not runs:
        raise ValueError("no runs to plot")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    loaded = []
    for i, run in enumerate(runs):
        if isinstance(run, Mapping):
            series, name = {key: list(values) for key, values in run.items()}, f"run {i}"
        else:
            csv_path = metrics_csv(run)
            name = csv_path.parent.parent.name if csv_path.parent.name == "csv" else csv_path.stem
            series = read_metrics(csv_path)
        loaded.append((labels[i] if labels is not None else name, series))
    return loaded


def _values(series: Series, metric: str, label: str) -> list[tuple[int, float]]:
    if metric not in series:
        raise ValueError(f"{label} has no values of {metric!r}; logged: {', '.join(sorted(series)) or 'nothing'}")
    return series[metric]


def _loss_buckets(series: Series, label: str) -> dict[int, str]:
    """``{k: "train/loss_t<k>"}`` for the buckets this run logged, by k."""
    buckets = {int(m[1]): name for name in series if (m := _LOSS_BUCKET.fullmatch(name))}
    if not buckets:
        raise ValueError(f"{label} has no values of 'train/loss_t<k>' (DiffusionModule's loss per range of t); "
                         f"logged: {', '.join(sorted(series)) or 'nothing'}")
    return dict(sorted(buckets.items()))


def _columns(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v for _, v in points]
