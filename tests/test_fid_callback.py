"""The in-training FID callback: logs val/fid_<n> on EMA samples and caches the real statistics."""

from __future__ import annotations

import csv
import json

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
    cached = list((tmp_path / "stats").glob("*.pt"))  # extractor=auto: the digit features on the digit data
    assert len(cached) == 1 and "digit_classifier" in cached[0].name and "n20" in cached[0].name
    assert torch.load(cached[0], weights_only=True)["features"].shape == (20, 128)
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
    real = FeatureStatistics.of(torch.load(next((tmp_path / "stats").glob("*.pt")), weights_only=True)["features"])
    fake = FeatureStatistics.of(extract(callback.extractor, torch.cat(samples)))
    assert logged[0] == pytest.approx(frechet_distance_of(real, fake), rel=1e-5)


def logged(run_dir, key):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


MONITORED = ["callbacks=fid", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=20",
             "callbacks.fid.batch_size=10", "callbacks.fid.sampler.num_steps=2", "trainer.max_steps=8", "optim.lr=3e-3",
             "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.monitor=val/fid_20",
             "callbacks.checkpoint.save_top_k=1", "callbacks.sample_grid.every_n_steps=0",
             "trainer.val_check_interval=4"]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_checkpoint_monitoring_fid_keeps_the_best_logged_step(tmp_path, mode):
    """callbacks.checkpoint.monitor=val/fid_20: the one step checkpoint kept is the argmin (mode=max: argmax) of the
    FIDs logged at the checkpoint steps; metrics.json holds the final FID and its interval."""
    run(make_cfg(tmp_path, *MONITORED, f"callbacks.checkpoint.mode={mode}",
                 f"callbacks.fid.cache_dir={tmp_path / 'stats'}"))
    values = logged(tmp_path, "val/fid_20")
    assert sorted(values) == [2, 4, 6, 8]
    best = (min if mode == "min" else max)(values, key=values.get)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.ckpt"))
    assert kept == [f"step_{best:06d}.ckpt"], (values, kept)
    final = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert final["val/fid_20"] == pytest.approx(values[8], rel=1e-6)
    lows, highs = logged(tmp_path, "val/fid_20_low"), logged(tmp_path, "val/fid_20_high")
    assert all(0 <= lows[s] <= values[s] <= highs[s] for s in values)
    assert final["val/fid_20_low"] == pytest.approx(lows[8], rel=1e-6)


def test_the_final_fid_at_the_end_of_training_reaches_metrics_json(tmp_path):
    """A FID computed when training ends (not at a multiple of every_n_steps), where Lightning allows no log."""
    run(make_cfg(tmp_path, "callbacks=fid", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=10",
                 "callbacks.fid.batch_size=10", "callbacks.fid.sampler.num_steps=2", "trainer.max_steps=3",
                 "callbacks.fid.bootstrap=0"))
    values = logged(tmp_path, "val/fid_10")
    assert sorted(values) == [2, 3]
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["val/fid_10"] == pytest.approx(values[3])


def test_early_stopping_watches_the_fid(tmp_path):
    run_overrides = ["callbacks=fid", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=10",
                     "callbacks.fid.batch_size=10", "callbacks.fid.sampler.num_steps=2", "trainer.max_steps=8",
                     "trainer.val_check_interval=2",
                     "+callbacks.early_stop._target_=lightning.pytorch.callbacks.EarlyStopping",
                     "+callbacks.early_stop.monitor=val/fid_10", "+callbacks.early_stop.stopping_threshold=1e9"]
    trainer = run(make_cfg(tmp_path, *run_overrides))
    assert trainer.global_step == 2  # the first FID is below the threshold: stopped at the first check


def test_a_monitored_fid_must_come_at_every_checkpoint_step(tmp_path):
    overrides = [o for o in MONITORED if not o.startswith("callbacks.fid.every_n_steps")]
    with pytest.raises(ValueError, match="set callbacks.fid.every_n_steps to a divisor of "
                                         "callbacks.checkpoint.every_n_train_steps \\(2\\), now 3"):
        run(make_cfg(tmp_path, *overrides, "callbacks.fid.every_n_steps=3"))


def test_digit_features_on_other_data_are_warned_about(tmp_path):
    from configs import write_shapes

    write_shapes(tmp_path / "shapes", per_class=4, size=8)
    with pytest.warns(UserWarning, match="digit-classifier features on imagefolder_shapes, which is not digit data"):
        run(make_cfg(tmp_path / "run", "data=imagefolder", f"data.root={tmp_path / 'shapes'}", "data.image_size=8",
                     "data.batch_size=4", "data.num_workers=0", "callbacks=fid", "extractor=digit",
                     "callbacks.fid.every_n_steps=0", "callbacks.fid.num_samples=6", "callbacks.fid.batch_size=6",
                     "callbacks.fid.sampler.num_steps=2", "trainer.max_steps=1", "callbacks.fid.bootstrap=0"))
