"""Figures of evaluation results (matplotlib, the ``plot`` extra): drawn to PNG files, for docs and dashboards."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from difflab.extras import require
from difflab.files import atomic_write


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
