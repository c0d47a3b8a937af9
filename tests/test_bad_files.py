"""Unreadable images in the data: data.on_error=raise names the file, skip replaces and counts it (across DataLoader
workers) and stops past data.max_skip_fraction; python -m difflab.data.check lists them before a run."""

from __future__ import annotations

import csv
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import random_split

from configs import make_cfg, write_shapes, write_shards
from difflab.data import ImageCaptionDataModule, ImageFolder
from difflab.data.check import main as check
from difflab.data.images import UnreadableImageError


def truncate(path: Path) -> Path:
    """Cut a PNG after its header: PIL opens it (size, mode) but cannot decode its pixels."""
    path.write_bytes(path.read_bytes()[:40])
    return path


def shapes(tmp_path: Path, per_class: int = 8) -> tuple[Path, ImageFolder]:
    root = write_shapes(tmp_path / "shapes", per_class=per_class, size=8)
    return root, ImageFolder(root, image_size=8)


def train_file(dataset: ImageFolder, n_val: int, seed: int = 0, which: int = 0) -> Path:
    """A file of the training split ImageCaptionDataModule makes (random_split with the seed)."""
    train, _ = random_split(range(len(dataset)), [len(dataset) - n_val, n_val],
                            generator=torch.Generator().manual_seed(seed))
    return dataset.items[train.indices[which]][0]


def full_pass(datamodule, epochs: int = 2) -> list[int]:
    """Every batch of the training and validation loaders, through the datamodule's main-process hook: the
    training batches' sizes."""
    sizes = []
    for _ in range(epochs):
        for batch in datamodule.train_dataloader():
            batch = datamodule.on_before_batch_transfer(batch, 0)
            assert "skipped" not in batch  # the model never sees it
            sizes.append(len(batch["image"]))
        for batch in datamodule.val_dataloader():
            datamodule.on_before_batch_transfer(batch, 0)
    return sizes


def test_raise_names_the_file_and_the_skip_option(tmp_path):
    root, dataset = shapes(tmp_path)
    bad = truncate(root / "square" / "002.png")
    with pytest.raises(UnreadableImageError, match=f"{bad}.*data.on_error=skip") as info:
        dataset[dataset.items.index(next(item for item in dataset.items if item[0] == bad))]
    assert info.value.path == bad
    # batch_size 2: 22 training images in 11 full batches, so drop_last never leaves the bad one out
    datamodule = ImageCaptionDataModule(dataset, image_size=8, batch_size=2, val_fraction=0.1)  # on_error=raise
    with pytest.raises(UnreadableImageError, match=f"{bad}.*data.on_error=skip"):
        full_pass(datamodule, epochs=1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_keeps_batches_full_and_reports_each_file_once(tmp_path, num_workers):
    root, dataset = shapes(tmp_path)  # 24 files: 22 train, 2 val
    bad = truncate(train_file(dataset, n_val=2))
    datamodule = ImageCaptionDataModule(dataset, image_size=8, batch_size=2, val_fraction=0.1,  # 11 full batches
                                        num_workers=num_workers, on_error="skip", max_skip_fraction=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sizes = full_pass(datamodule, epochs=2)  # the bad file is met in both epochs
    assert sizes == [2] * (2 * 11)
    reports = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert reports == [f"skipped unreadable file {bad} (1 so far; data.on_error=skip)"]
    assert list(datamodule.skipped.paths) == [str(bad)]
    assert datamodule.state_dict()["skipped_files"]["paths"] == [str(bad)]  # kept in checkpoints


def test_skip_stops_once_past_max_skip_fraction(tmp_path):
    root, dataset = shapes(tmp_path)  # 24 files
    bad = [truncate(train_file(dataset, n_val=2, which=i)) for i in range(2)]
    datamodule = ImageCaptionDataModule(dataset, image_size=8, batch_size=2, val_fraction=0.1, on_error="skip",
                                        max_skip_fraction=0.05)  # 1 / 24 is within it, 2 / 24 is not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"^2 unreadable files of 24 files \(8.33%\) in .*shapes, more than "
                                               r"data.max_skip_fraction=0.05 \(e.g. .*png\): list them with python -m "
                                               r"difflab.data.check .*shapes and remove them, or raise "
                                               r"data.max_skip_fraction$") as info:
            full_pass(datamodule, epochs=1)
    assert "\n" not in str(info.value) and any(str(path) in str(info.value) for path in bad)


def test_on_error_must_be_raise_or_skip(tmp_path):
    _, dataset = shapes(tmp_path)
    with pytest.raises(ValueError, match="data.on_error='ignore': expected one of raise, skip"):
        ImageCaptionDataModule(dataset, image_size=8, batch_size=4, on_error="ignore")


def test_check_lists_exactly_the_unreadable_files(tmp_path, capsys):
    root, _ = shapes(tmp_path)
    bad = [truncate(root / "circle" / "001.png"), root / "triangle" / "005.png"]
    bad[1].write_bytes(b"not an image at all")
    assert check([str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split(": ")[1] for line in out if line.startswith("unreadable: ")) == sorted(map(str, bad))
    assert out[-1] == f"24 files, 2 unreadable ({root})"


def test_check_clean_folder_and_missing_folder(tmp_path, capsys):
    root, _ = shapes(tmp_path)
    assert check([str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"24 files, 0 unreadable ({root})"
    assert check([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no such folder or shards: {tmp_path / 'nope'}"


def test_check_as_a_module(tmp_path):
    root, _ = shapes(tmp_path)
    bad = truncate(root / "square" / "000.png")
    result = subprocess.run([sys.executable, "-m", "difflab.data.check", str(root)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert [line.split(": ")[1] for line in result.stdout.splitlines() if line.startswith("unreadable")] == [str(bad)]


def bad_shard(shards: Path) -> str:
    """A shard beside the good ones with one sample whose .png is garbage: its name as check and skip print it."""
    (shards / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (shards / "garbage.txt").write_text("a photo of a cat")
    (shards / "garbage.cls").write_text("0")
    with tarfile.open(shards / "shard-bad.tar", "w") as tar:
        for suffix in ("png", "txt", "cls"):
            tar.add(shards / f"garbage.{suffix}", arcname=f"000000999.{suffix}")
            (shards / f"garbage.{suffix}").unlink()
    return f"{shards / 'shard-bad.tar'}:000000999.png"


def test_shards_check_skip_and_raise(tmp_path, capsys):
    from difflab.data.shards import WebDataModule

    shards = write_shards(tmp_path)  # 26 samples
    bad = bad_shard(shards)
    assert check([str(shards)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1] for line in out if line.startswith("unreadable: ")] == [bad]
    assert out[-1] == "27 files, 1 unreadable (7 shards)"

    skipping = WebDataModule(str(shards), image_size=8, batch_size=4, num_workers=0, on_error="skip",
                             max_skip_fraction=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = sum(len(skipping.on_before_batch_transfer(batch, 0)["image"]) for batch in skipping.val_dataloader())
    assert seen == 26 and list(skipping.skipped.paths) == [bad]
    assert [str(w.message) for w in caught if "unreadable" in str(w.message)] == [
        f"skipped unreadable file {bad} (1 so far; data.on_error=skip)"]

    raising = WebDataModule(str(shards), image_size=8, batch_size=4, num_workers=0)
    with pytest.raises(UnreadableImageError, match="000000999.png.*data.on_error=skip"):
        list(raising.val_dataloader())


def test_training_skips_a_bad_file_and_logs_data_skipped(tmp_path):
    from difflab.cli.train import run

    root, dataset = shapes(tmp_path, per_class=3)  # 9 files: 8 train (one batch: every step reads each), 1 val
    bad = truncate(train_file(dataset, n_val=1))
    cfg = make_cfg(tmp_path / "run", "data=imagefolder", f"data.root={root}", "data.image_size=8", "data.channels=3",
                   "data.batch_size=8", "data.val_fraction=0.1", "data.num_workers=0", "data.on_error=skip",
                   "data.max_skip_fraction=0.2", "logger=csv")
    with pytest.warns(UserWarning, match=f"skipped unreadable file {bad} \\(1 so far"):
        trainer = run(cfg)
    assert trainer.global_step == 2
    with open(tmp_path / "run" / "csv" / "metrics.csv", newline="") as f:
        logged = [float(row["data/skipped"]) for row in csv.DictReader(f) if row.get("data/skipped")]
    assert logged and logged[-1] == 1
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["ImageCaptionDataModule"]["skipped_files"]["paths"] == [str(bad)]  # a resumed run keeps it
