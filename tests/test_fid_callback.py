"""The in-training FID callback: logs val/fid_<n> on EMA samples and caches the real statistics."""

from __future__ import annotations

import csv

import pytest
import torch

from configs import make_cfg
from difflab.cli.train import run
from difflab.metrics.frechet import FeatureStatistics


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


def test_fid_callback_writes_the_sample_grid_beside_the_figure(tmp_path):
    run(make_cfg(tmp_path, "callbacks=fid", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=9",
                 "callbacks.fid.batch_size=9", "callbacks.fid.sampler.num_steps=2"))
    assert (tmp_path / "fid_samples" / "step_000002.png").is_file()
    assert fid_values_named(tmp_path, "val/fid_9_seconds")[0] > 0


def fid_values_named(run_dir, key):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.slow
def test_fid_under_two_process_ddp_equals_one_process_on_the_same_samples(tmp_path):
    """Two CPU processes (gloo): each samples its share with its own seed, the features are all-gathered and both
    ranks compute the figure. One process on the same samples (the two shares, regenerated from the checkpoint
    with the same seeds and conditions) gives the same FID."""
    from difflab.diffusion import DPMSolverPlusPlus2MSampler
    from difflab.lightning.fid import FIDCallback
    from difflab.loading import load_module
    from difflab.metrics.features import DigitFeatures, extract
    from difflab.metrics.frechet import frechet_distance_of

    n, world = 12, 2
    overrides = ["callbacks=fid", "callbacks.fid.every_n_steps=0", f"callbacks.fid.num_samples={n}",
                 "callbacks.fid.batch_size=4", "callbacks.fid.sampler.num_steps=2", "trainer.max_steps=1",
                 "callbacks.checkpoint.every_n_train_steps=1", "+trainer.strategy=ddp_spawn",
                 f"trainer.devices={world}",
                 "callbacks.sample_grid.every_n_steps=0", f"callbacks.fid.cache_dir={tmp_path / 'stats'}"]
    assert run(make_cfg(tmp_path, *overrides)).world_size == world
    logged = fid_values_named(tmp_path, f"val/fid_{n}")
    assert len(logged) == 1
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    callback = FIDCallback(DigitFeatures(), num_samples=n)
    sampler = DPMSolverPlusPlus2MSampler(num_steps=2)  # the callback's sampler (conf/callbacks/fid)
    conditions = module.conditioner.examples(n, module.device)
    # sample k of the whole set has seed seed + 1 + k, whichever rank drew it
    samples = [module.pipeline()(condition=conditions, sampler=sampler, seed=[callback.seed + 1 + k for k in range(n)],
                                 batch_size=5) * 2 - 1]
    real = FeatureStatistics.from_state_dict(torch.load(next((tmp_path / "stats").glob("*.pt")), weights_only=True))
    fake = FeatureStatistics.of(extract(callback.extractor, torch.cat(samples)))
    assert logged[0] == pytest.approx(frechet_distance_of(real, fake), rel=1e-5)
