"""difflab.plots' training curves and schedule figures: metrics.csv parsed as Lightning writes it, and each figure
drawn from the values it was given, to a PNG that opens."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from difflab.diffusion.schedules import NoiseSchedule
from difflab.plots import (
    loss_by_t_figure,
    metric_figure,
    plot_loss_by_t,
    plot_metric,
    plot_schedules,
    read_metrics,
    schedules_figure,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
Image = pytest.importorskip("PIL.Image")

# Lightning's CSVLogger: a row per log_metrics call, blank where that call did not log a column; the last two rows
# are a run resumed from its step-9 checkpoint appending to the same file.
METRICS_CSV = """\
epoch,lr-AdamW,step,train/loss,val/fid_1k,val/fid_1k_high,val/fid_1k_low
,0.0001,4,,,,
0,,4,0.5,,,
,0.0002,9,,,,
0,,9,0.25,,,
0,,9,,40.5,43.0,38.0
1,,14,nan,,,
1,,14,,30.0,31.5,29.0
0,,9,0.3,,,
1,,19,0.125,,,
"""


def write_run(folder: Path, text: str = METRICS_CSV) -> Path:
    (folder / "csv").mkdir(parents=True)
    (folder / "csv" / "metrics.csv").write_text(text)
    return folder


def bucket_run(folder: Path, buckets: int = 10, steps: int = 12, scale: float = 1.0) -> Path:
    """A run that logged train/loss_t0..t<buckets-1> every 5 steps, bucket k's loss (k + 1) * scale / step."""
    names = [f"train/loss_t{k}" for k in range(buckets)]
    rows = ["step,train/loss," + ",".join(names)]
    for i in range(steps):
        step = 5 * i + 4
        rows.append(f"{step},1.0," + ",".join(str((k + 1) * scale / step) for k in range(buckets)))
    return write_run(folder, "\n".join(rows) + "\n")


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


def test_read_metrics_keeps_logged_values_sorted_by_step(tmp_path):
    run = write_run(tmp_path / "run")
    expected = {
        "epoch": [(4, 0.0), (9, 0.0), (14, 1.0), (19, 1.0)],
        "lr-AdamW": [(4, 0.0001), (9, 0.0002)],
        "train/loss": [(4, 0.5), (9, 0.3), (19, 0.125)],  # the NaN dropped, step 9's resumed value kept
        "val/fid_1k": [(9, 40.5), (14, 30.0)],
        "val/fid_1k_high": [(9, 43.0), (14, 31.5)],
        "val/fid_1k_low": [(9, 38.0), (14, 29.0)],
    }
    assert read_metrics(run) == expected
    assert read_metrics(run / "csv" / "metrics.csv") == expected


def test_read_metrics_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        read_metrics(tmp_path)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="'step'"):
        read_metrics(tmp_path / "other.csv")


def test_plot_metric_draws_a_line_per_run_and_the_interval(tmp_path):
    runs = [write_run(tmp_path / "a"), write_run(tmp_path / "b")]
    fig = metric_figure(runs, ["val/fid_1k", "train/loss"])
    fid, loss = fig.axes
    assert [line.get_label() for line in fid.lines] == ["a", "b"]
    assert list(fid.lines[0].get_xdata()) == [9, 14] and list(fid.lines[0].get_ydata()) == [40.5, 30.0]
    assert list(loss.lines[1].get_ydata()) == [0.5, 0.3, 0.125]
    assert len(fid.collections) == 2 and not loss.collections  # an interval per run, only where logged
    band = fid.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 29.0 and band[:, 1].max() == 43.0
    out = plot_metric(runs, "val/fid_1k", tmp_path / "figs" / "fid.png", labels=["ema", "raw"], log_y=True)
    assert out == tmp_path / "figs" / "fid.png"
    assert_png(out)


def test_plot_metric_takes_read_series(tmp_path):
    fig = metric_figure({"train/loss": [(1, 2.0), (2, 1.0)]}, "train/loss")
    (ax,) = fig.axes
    assert len(ax.lines) == 1 and list(ax.lines[0].get_ydata()) == [2.0, 1.0]
    assert ax.get_legend() is None  # one run, no interval: nothing to tell apart


def test_missing_metric_names_it_and_the_logged_ones(tmp_path):
    run = write_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"run has no values of 'val/fid_50k'; logged: epoch, lr-AdamW, train/loss"):
        plot_metric(run, "val/fid_50k", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"'train/loss_t<k>'.*logged: epoch"):
        plot_loss_by_t(run, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_loss_by_t_panels(tmp_path):
    runs = [bucket_run(tmp_path / "base"), bucket_run(tmp_path / "ablation", scale=2.0)]
    fig = loss_by_t_figure(runs, window=3)
    over_steps, by_t = fig.axes[:2]  # the third is (a)'s colour bar
    assert len(over_steps.lines) == 10  # the first run's buckets
    first_steps, last_steps = [4, 9, 14], [49, 54, 59]
    assert list(over_steps.lines[9].get_ydata()) == [10 / (5 * i + 4) for i in range(12)]
    assert len(by_t.lines) == 4  # start and end per run
    start, end = by_t.lines[2].get_ydata(), by_t.lines[3].get_ydata()  # the ablation's
    assert np.allclose(by_t.lines[0].get_xdata(), [(k + 0.5) / 10 for k in range(10)])
    assert np.allclose(start, [2 * (k + 1) * np.mean([1 / s for s in first_steps]) for k in range(10)])
    assert np.allclose(end, [2 * (k + 1) * np.mean([1 / s for s in last_steps]) for k in range(10)])
    assert by_t.get_yscale() == "log"
    assert_png(plot_loss_by_t(runs[0], tmp_path / "loss_by_t.png"))


def test_plot_loss_by_t_start_and_end_never_overlap(tmp_path):
    fig = loss_by_t_figure(bucket_run(tmp_path / "short", buckets=2, steps=3), window=5)
    start, end = (line.get_ydata() for line in fig.axes[1].lines)
    assert np.allclose(start, [1 / 4, 2 / 4]) and np.allclose(end, [1 / 14, 2 / 14])


def test_plot_schedules_log_snr_is_the_schedules(tmp_path):
    zero_snr = NoiseSchedule.from_name("linear", zero_terminal_snr=True)
    fig = schedules_figure(["linear", "cosine", zero_snr], num_timesteps=200)
    alpha_bar_ax, snr_ax, log_snr_ax = fig.axes
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3]
    assert snr_ax.get_yscale() == "log"
    for i, schedule in enumerate([NoiseSchedule.linear(200), NoiseSchedule.cosine(200), zero_snr]):
        alpha_bar = schedule.alphas_cumprod.numpy()
        assert np.array_equal(alpha_bar_ax.lines[i].get_ydata(), alpha_bar)
        finite = alpha_bar > 0
        with np.errstate(divide="ignore"):
            assert np.allclose(log_snr_ax.lines[i].get_ydata()[finite],
                               np.log(alpha_bar / (1 - alpha_bar))[finite], rtol=1e-12, atol=0)
    assert math.isinf(log_snr_ax.lines[2].get_ydata()[-1])  # zero terminal SNR: log-SNR -inf, left undrawn
    assert [line.get_label() for line in alpha_bar_ax.lines][2] == "linear (zero terminal SNR)"
    assert_png(plot_schedules(["linear", "scaled_linear"], tmp_path / "schedules.png"))


def test_bench_script_wraps_plot_metric(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    script = Path(__file__).parents[1] / "bench" / "plot_metrics.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(run), "--metrics", "val/fid_1k", "train/loss",
                                      "--out", str(tmp_path / "m.png")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "val/fid_1k\t14\t30\n" in printed and f"wrote {tmp_path / 'm.png'}" in printed
    assert_png(tmp_path / "m.png")
    monkeypatch.setattr(sys, "argv", [str(script), str(run), "--loss-by-t"])
    with pytest.raises(SystemExit) as exit_:  # a usage error, not a traceback
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 2 and "train/loss_t<k>" in capsys.readouterr().err
