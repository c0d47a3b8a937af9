"""The in-training FID callback: logs val/fid_<n> on EMA samples and caches the real statistics."""

from __future__ import annotations

import csv

import torch

from difflab.cli.train import run
from difflab.metrics.frechet import FeatureStatistics
from test_train import make_cfg


def fid_values(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(row["val/fid_20"]) for row in csv.DictReader(f) if row.get("val/fid_20")]


def test_fid_callback_logs_and_caches_real_statistics(tmp_path):
    overrides = ["callbacks=fid", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=20",
                 "callbacks.fid.batch_size=8", "callbacks.fid.sampler.num_steps=2", "trainer.max_steps=2",
                 f"callbacks.fid.cache_dir={tmp_path / 'stats'}"]
    run(make_cfg(tmp_path / "a", *overrides))
    values = fid_values(tmp_path / "a")
    assert len(values) == 1 and values[0] > 0 and torch.isfinite(torch.tensor(values[0]))
    cached = list((tmp_path / "stats").glob("*.pt"))
    assert len(cached) == 1 and "digit_classifier" in cached[0].name and "n20" in cached[0].name
    stats = FeatureStatistics.from_state_dict(torch.load(cached[0], weights_only=True))
    assert stats.count == 20 and stats.mean.shape == (128,)
    before = cached[0].stat().st_mtime_ns
    run(make_cfg(tmp_path / "b", *overrides))  # a second run reuses the cached real statistics
    assert cached[0].stat().st_mtime_ns == before
    assert len(fid_values(tmp_path / "b")) == 1
