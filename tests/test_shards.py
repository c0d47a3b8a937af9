"""webdataset shards: written from a folder, read back completely, split across ranks, resampled for training."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset")
from difflab.data.make_shards import main as make_shards  # noqa: E402
from difflab.data.shards import ShardedImages, WebDataModule  # noqa: E402


@pytest.fixture
def shards(tmp_path):
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(13):
            Image.new("RGB", (12, 10), (label * 200, i * 15, 0)).save(tmp_path / "src" / name / f"{i}.png")
    make_shards([str(tmp_path / "src"), str(tmp_path / "shards"), "--shard-size", "5"])
    return tmp_path / "shards"


def test_shards_are_read_back_completely(shards):
    assert len(list(shards.glob("shard-*.tar"))) == 6  # 26 images, 5 per shard
    samples = list(ShardedImages(shards, image_size=8, channels=3))
    assert len(samples) == 26 and len({s["key"] for s in samples}) == 26
    assert {s["label"] for s in samples} == {0, 1} and samples[0]["caption"] == "a photo of a cat"
    assert samples[0]["image"].shape == (3, 8, 8) and samples[0]["image"].min() >= -1
    dog = next(s for s in samples if s["label"] == 1)
    assert dog["image"][0].mean() > 0.5  # red channel 200/255 -> 0.57 in [-1, 1]


def test_every_rank_gets_distinct_samples(shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({s["key"] for s in ShardedImages(shards, image_size=8)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 26


def test_training_stream_is_resampled_with_a_fixed_epoch_and_seeded(shards, monkeypatch):
    stream = ShardedImages(shards, image_size=8, resampled=True, epoch_length=40, seed=3)
    first = [s["key"] for s in stream]
    assert len(first) == 40  # longer than the data: resampled
    assert [s["key"] for s in ShardedImages(shards, image_size=8, resampled=True, epoch_length=40, seed=3)] == first
    assert [s["key"] for s in ShardedImages(shards, image_size=8, resampled=True, epoch_length=40, seed=4)] != first
    monkeypatch.setenv("RANK", "1")  # another rank draws its own stream
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [s["key"] for s in ShardedImages(shards, image_size=8, resampled=True, epoch_length=40, seed=3)] != first


def test_webdataset_datamodule_trains(shards, tmp_path):
    from difflab.cli.train import run
    from test_train import make_cfg

    trainer = run(make_cfg(tmp_path / "run", "data=webdataset", f"data.train_urls={shards}", "data.num_workers=0",
                           "data.image_size=8", "data.batch_size=8", "data.epoch_length=16", "data.num_classes=2",
                           "trainer.max_steps=3"))
    assert trainer.global_step == 3 and trainer.current_epoch >= 1  # two batches per epoch
    batch = next(iter(WebDataModule(shards, image_size=8, batch_size=4, num_workers=0).train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and isinstance(batch["label"], torch.Tensor)
