"""webdataset shards: written from a folder, read back completely, split across ranks, resampled for training."""

from __future__ import annotations

import io
import pickle
import tarfile

import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset")
from configs import write_shards  # noqa: E402
from difflab.data.make_shards import main as make_shards  # noqa: E402
from difflab.data.shards import ShardedImages, WebDataModule  # noqa: E402


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path)


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
    from configs import make_cfg
    from difflab.cli.train import run

    trainer = run(make_cfg(tmp_path / "run", "data=webdataset", f"data.train_urls={shards}", "data.num_workers=0",
                           "data.image_size=8", "data.batch_size=8", "data.epoch_length=16", "data.num_classes=2",
                           "trainer.max_steps=3"))
    assert trainer.global_step == 3 and trainer.current_epoch >= 1  # two batches per epoch
    batch = next(iter(WebDataModule(shards, image_size=8, batch_size=4, num_workers=0).train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and isinstance(batch["label"], torch.Tensor)


@pytest.fixture(scope="module")
def encoded_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoded")
    for label, name in enumerate(["cat", "dog", "small red bird"]):
        (root / "src" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 10), (label * 100, i * 40, 0)).save(root / "src" / name / f"{i}.png")
    make_shards([str(root / "src"), str(root / "shards"), "--shard-size", "5", "--text-encoder", "minilm"])
    return root / "shards"


@pytest.fixture(scope="module")
def text_conditioner():
    from difflab.conditioning import TextConditioner, minilm

    return TextConditioner(minilm(), drop_prob=0.0, cache=False)


def test_precomputed_caption_encodings_equal_encoding_at_train_time(encoded_shards, text_conditioner):
    loader = torch.utils.data.DataLoader(ShardedImages(encoded_shards, image_size=8, text_length=16), batch_size=6)
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == 12
    for batch in batches:
        assert batch["context"].shape == (len(batch["caption"]), 16, 384)
        stored = text_conditioner(batch)  # the batch's own encodings, trimmed to its longest caption
        online = text_conditioner.encode(list(batch["caption"]))
        assert torch.equal(stored["context_mask"], online["context_mask"])
        real = online["context_mask"][..., None]
        torch.testing.assert_close(stored["context"] * real, online["context"] * real, rtol=0, atol=4e-3)  # float16
        torch.testing.assert_close(stored["cond"], online["cond"], rtol=0, atol=2e-3)
    assert {int(b["context_mask"].sum(1).max()) for b in batches} != {16}  # trimmed, not padded to text_length


def test_precomputed_encodings_of_another_width_are_refused(encoded_shards):
    from difflab.conditioning import TextConditioner

    class Narrow:  # an encoder of 8-dimensional states
        dim = 8

    batch = next(iter(torch.utils.data.DataLoader(ShardedImages(encoded_shards, image_size=8), batch_size=2)))
    with pytest.raises(ValueError, match="384-dimensional but this run's text encoder gives 8.*--text-encoder"):
        TextConditioner(Narrow())(batch)


def test_training_on_precomputed_encodings_never_encodes_a_caption(encoded_shards, tmp_path, monkeypatch):
    from configs import make_cfg
    from difflab.cli.train import run
    from difflab.conditioning import TextEncoder

    encoded = []
    original = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, texts: encoded.extend(texts) or original(self, texts))
    trainer = run(make_cfg(tmp_path, "data=webdataset", f"data.train_urls={encoded_shards}", "data.num_workers=0",
                           "data.image_size=8", "data.batch_size=4", "data.epoch_length=8", "conditioning=text",
                           "trainer.max_steps=3"))
    assert trainer.global_step == 3
    captions = {"a photo of a cat", "a photo of a dog", "a photo of a small red bird"}
    assert encoded and not captions & set(encoded)  # only the null and the preview prompts were encoded


class Copy:
    """Unpickling it copies a file (what a pickle payload does)."""

    def __init__(self, src, dst):
        self.src, self.dst = str(src), str(dst)

    def __reduce__(self):
        import shutil

        return shutil.copyfile, (self.src, self.dst)


def test_shard_members_are_never_unpickled(tmp_path):
    """webdataset's default decoders would unpickle the .pyd member and torch.load the .pth one."""
    marker = tmp_path / "payload-ran"
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(png, format="PNG")
    members = {"png": png.getvalue(), "cls": b"1", "txt": b"a red square",
               "pyd": pickle.dumps(Copy(__file__, marker)),
               "pth": pickle.dumps(Copy(__file__, marker))}
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"sample0.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(ShardedImages(str(tmp_path / "shard-000000.tar"), image_size=8))
    assert len(samples) == 1 and samples[0]["label"] == 1 and samples[0]["caption"] == "a red square"
    assert not marker.exists()


# ---- odd and hostile shards ----------------------------------------------------------------------------------


def write_tar(path, samples: dict[str, dict[str, bytes]]):
    """A tar of ``{key: {extension: bytes}}`` members, as webdataset reads them."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def encoded(format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 0)).save(buffer, format=format)
    return buffer.getvalue()


def test_missing_and_unopenable_shards_count_toward_the_skip_limit(shards, tmp_path):
    from difflab.errors import RunStopped, UsageError

    (shards / "shard-000006.tar").write_bytes(b"not a tar file")
    pattern = str(shards / "shard-{000000..000009}.tar")  # 6 good, 1 not a tar, 3 missing
    with pytest.raises(UsageError, match=r"4 of the 10 shards are missing or not tar files .*on_error=skip"):
        ShardedImages(pattern, image_size=8)
    with pytest.raises(RunStopped, match=r"4 of the 10 shards .*more than data.max_skip_fraction=0.01"):
        ShardedImages(pattern, image_size=8, on_error="skip")
    with pytest.warns(UserWarning, match="4 of the 10 shards"):
        stream = ShardedImages(pattern, image_size=8, on_error="skip", max_skip_fraction=0.5)
    assert len(list(stream)) == 26 and len(stream.urls) == 6
    with pytest.raises(UsageError, match="none of the 5 shards can be read"):  # a resampled stream of none: no end
        ShardedImages(str(tmp_path / "gone-{0..4}.tar"), image_size=8, resampled=True, epoch_length=8,
                      on_error="skip", max_skip_fraction=1.0)


def test_shards_without_captions_or_labels_are_read_and_one_without_an_image_is_named(tmp_path):
    from difflab.errors import UsageError

    tar = write_tar(tmp_path / "odd-000000.tar", {"a": {"png": encoded("PNG"), "cls": b"1"},  # class only
                                                  "b": {"jpg": encoded("JPEG")}})  # image only, as img2dataset
    samples = list(ShardedImages(str(tar), image_size=8))
    assert [(s["key"], s["label"], s["caption"]) for s in samples] == [("a", 1, ""), ("b", -1, "")]
    assert samples[1]["image"][0].mean() > 0.4  # the JPEG decoded: red
    tar = write_tar(tmp_path / "odd-000001.tar", {"c": {"txt": b"a caption and nothing else"}})
    with pytest.raises(UsageError, match=r"odd-000001.tar:c has no image \(txt; expected one of .png"):
        list(ShardedImages(str(tar), image_size=8))


def test_shard_image_limits_are_configurable(shards, tmp_path):
    from configs import make_cfg
    from difflab.data.images import UnreadableImageError
    from difflab.training import build

    with pytest.raises(UnreadableImageError, match="more than max_pixels=50"):
        list(ShardedImages(shards, image_size=8, max_pixels=50))
    with pytest.raises(UnreadableImageError, match="aspect ratio of 1.2, more than max_aspect_ratio=1.1"):
        list(ShardedImages(shards, image_size=8, max_aspect_ratio=1.1))  # the images are 12 x 10
    _, datamodule, _ = build(make_cfg(tmp_path, "data=webdataset", f"data.train_urls={shards}", "data.max_pixels=50",
                                      "data.max_aspect_ratio=null", "data.num_classes=2"))
    assert (datamodule.train_set.max_pixels, datamodule.val_set.max_aspect_ratio) == (50, None)


def test_webdataset_with_the_fid_callback_evaluate_and_probes(shards, tmp_path):
    """Shards have no length: the FID callback, evaluate.py and the probes read their first n samples."""
    from configs import compose_config, make_cfg
    from difflab.cli.evaluate import evaluate
    from difflab.cli.train import run
    from difflab.probe.common import real_batch

    trainer = run(make_cfg(tmp_path / "run", "data=webdataset", f"data.train_urls={shards}", "data.num_workers=0",
                           "data.image_size=8", "data.batch_size=8", "data.epoch_length=16", "data.num_classes=2",
                           "trainer.max_steps=2", "callbacks=fid", "callbacks.fid.every_n_steps=2",
                           "callbacks.fid.num_samples=10", "callbacks.fid.batch_size=10",
                           "callbacks.fid.sampler.num_steps=2", f"callbacks.fid.cache_dir={tmp_path / 'stats'}"))
    assert torch.isfinite(trainer.callback_metrics["val/fid_10"])
    assert [p.name for p in (tmp_path / "stats").glob("*_trainstream_*n10.pt")]  # the first 10 samples' features
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = evaluate(compose_config("evaluate", f"ckpt={ckpt}", "n=10", "steps=2", "metrics=[fid]", "bootstrap=0",
                                     "progress=false", f"out={tmp_path / 'eval.json'}"))
    assert result["n"] == result["n_real"] == 10 and result["fid"] > 0
    batch = real_batch(str(ckpt), n=4)
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].tolist() == [0, 0, 0, 0]  # shard order: cats
