"""``model=ldm`` given no first stage: the run fits an autoencoder on its data first, keeps it in the run directory and
in a cache keyed on the data's files and the autoencoder's config, and the next run on the same data reuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import difflab
from configs import TINY_LATENT_NETWORK, make_cfg
from difflab.data.fingerprint import data_fingerprint
from difflab.errors import UsageError
from difflab.first_stage_training import RECORD, STAGE_DIR, autoencoder_config, cache_key, wanted
from difflab.training import run

ROOT = Path(__file__).resolve().parents[1]
TINY_STAGE = ["first_stage_training.model.autoencoder.channels=8",
              "first_stage_training.model.autoencoder.channel_mult=[1,2]",
              "first_stage_training.model.autoencoder.norm_groups=4"]  # f = 2: 4x4x4 latents of the 8x8 digits
SMALL = [*TINY_STAGE, *TINY_LATENT_NETWORK, "sampler.num_steps=4"]  # with make_cfg's shrunk run
COMMAND_LINE = ["data=digits", "data.batch_size=16", "trainer.max_steps=10", "trainer.val_check_interval=5",
                "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "callbacks.sample_grid.every_n_steps=5",
                "callbacks.sample_grid.num_samples=4", "callbacks.checkpoint.every_n_train_steps=5", *SMALL]


def train_cli(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFLAB_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=ldm", "schedule=cosine",
                             f"hydra.run.dir={run_dir}", *COMMAND_LINE, *overrides], cwd=run_dir.parent, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def test_ldm_with_no_first_stage_trains_one_and_the_next_run_reuses_it(tmp_path):
    cache = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    output = train_cli(first, cache)
    stage = first / STAGE_DIR
    autoencoder = stage / "checkpoints" / "last.ckpt"
    assert json.loads((stage / RECORD).read_text())["trained"] is True
    assert (stage / "config.yaml").is_file() and (stage / "metrics.json").is_file()  # a run of its own
    assert "fitting an autoencoder on the data first" in output.stdout + output.stderr
    # the budget split: 0.4 of the 10 steps to the autoencoder, the rest to the latent model
    assert global_step(autoencoder) == 4 and global_step(first / "checkpoints" / "last.ckpt") == 6
    cached = list((cache / "first_stages").glob("*/last.ckpt"))
    assert len(cached) == 1 and cached[0].read_bytes() == autoencoder.read_bytes()

    pipe = difflab.load(first / "checkpoints" / "last.ckpt")
    images = pipe(label=[3, 7], steps=2, seed=0, progress=False)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    weights = torch.load(autoencoder, map_location="cpu", weights_only=True)["state_dict"]
    loaded = pipe.model.first_stage.autoencoder.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("autoencoder.")], v) for k, v in weights.items()
               if k.startswith("autoencoder."))

    output = train_cli(second, cache)
    stage = second / STAGE_DIR
    assert json.loads((stage / RECORD).read_text())["trained"] is False
    assert not (stage / "config.yaml").exists() and not (stage / "samples").exists()  # not trained again
    assert (stage / "checkpoints" / "last.ckpt").read_bytes() == autoencoder.read_bytes()
    assert "reusing the autoencoder" in output.stdout + output.stderr
    assert global_step(second / "checkpoints" / "last.ckpt") == 10  # the whole budget


def test_a_resumed_run_uses_its_own_autoencoder_and_a_given_one_skips_the_stage(tmp_path):
    cfg = make_cfg(tmp_path / "run", "model=ldm", *SMALL, "trainer.max_steps=5", "first_stage_training.cache_dir=null")
    assert wanted(cfg)
    run(cfg)
    autoencoder = tmp_path / "run" / STAGE_DIR / "checkpoints" / "last.ckpt"
    before = autoencoder.read_bytes()
    assert global_step(autoencoder) == 2 and global_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 3
    # resumed (ckpt_path=auto) with a longer budget: the latent model continues on the same autoencoder
    trainer = run(make_cfg(tmp_path / "run", "model=ldm", *SMALL, "trainer.max_steps=8",
                           "first_stage_training.cache_dir=null"))
    assert autoencoder.read_bytes() == before and trainer.global_step == 5  # the latent model's share of 8 steps
    key = cache_key(cfg, autoencoder_config(cfg, tmp_path / "run" / STAGE_DIR))
    assert not (Path(os.environ["DIFFLAB_CACHE_DIR"]) / "first_stages" / key).exists()  # cache_dir=null
    given = make_cfg(tmp_path / "other", "model=ldm", *SMALL, f"first_stage.ckpt={autoencoder}")
    assert not wanted(given)


def test_a_cache_that_cannot_be_written_is_warned_about_and_the_run_goes_on(tmp_path):
    (tmp_path / "not_a_folder").write_text("a file where the cache folder would be")
    with pytest.warns(UserWarning, match="could not cache the autoencoder"):
        run(make_cfg(tmp_path / "run", "model=ldm", *SMALL, "trainer.max_steps=3",
                     f"first_stage_training.cache_dir={tmp_path / 'not_a_folder'}"))
    assert (tmp_path / "run" / STAGE_DIR / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_the_cache_key_follows_the_data_files_and_the_autoencoder_config(tmp_path):
    from PIL import Image

    root = tmp_path / "images" / "cat"
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), i * 40).save(root / f"{i}.png")

    def key(*overrides: str) -> str:
        cfg = make_cfg(tmp_path / "run", "model=ldm", "data=imagefolder", f"data.root={root.parent}", *overrides)
        return cache_key(cfg, autoencoder_config(cfg, tmp_path / "run" / STAGE_DIR))

    base = key()
    assert key("data.num_workers=0") == base  # how files are read is not which files
    Image.new("L", (8, 8), 255).save(root / "3.png")
    added = key()
    assert added != base
    os.utime(root / "0.png", ns=(1, 1))  # replaced: its modification time moves
    assert key() != added
    assert key("first_stage_training.model.autoencoder.latent_channels=3") != key()
    assert key("data.image_size=16") != key()


def test_data_fingerprint_reads_brace_patterns_and_files(tmp_path):
    shards = [tmp_path / f"shard-{i:02d}.tar" for i in range(2)]
    for path in shards:
        path.write_bytes(b"x")
    config = {"train_urls": str(tmp_path / "shard-{00..01}.tar"), "batch_size": 4}
    before = data_fingerprint(config)
    shards[1].write_bytes(b"xy")
    assert data_fingerprint(config) != before
    assert data_fingerprint({"dataset": {"_target_": "difflab.data.mnist", "image_size": 32}}) != \
        data_fingerprint({"dataset": {"_target_": "difflab.data.mnist", "image_size": 16}})


def test_budget_split_of_the_default_run():
    from difflab.first_stage_training import _scaled_budget, _split

    cfg = OmegaConf.create({"trainer": {"max_time": "00:00:12:00", "max_steps": 100000}})
    stage, latent = _scaled_budget(cfg, 0.4), _split(cfg, 0.4)
    assert stage.trainer.max_time == "00:00:04:48" and latent.trainer.max_time == "00:00:07:12"
    assert stage.trainer.max_steps == 40000 and latent.trainer.max_steps == 60000
    unlimited = OmegaConf.create({"trainer": {"max_time": None, "max_steps": -1}})
    assert _split(unlimited, 0.4).trainer == unlimited.trainer
    with pytest.raises(UsageError, match="between 0 and 1"):
        _split(cfg, 1.0)
