"""Image folders written by a stranger: elongated or huge images refused from their header (and skipped under
on_error=skip), 16-bit images scaled rather than clipped, metadata.jsonl confined to its folder and its bad lines
named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difflab.data import ImageFolder
from difflab.data.images import UnreadableImageError, read_image
from difflab.data.layout import FolderLayout
from difflab.errors import UsageError


def test_a_strip_of_pixels_is_refused_before_decoding(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("L", (20000, 1)).save(strip)
    assert strip.stat().st_size < 1000  # tiny on disk; as a resized 32-pixel tensor, 20000 x 32 x 32
    with pytest.raises(UnreadableImageError, match=r"20000x1 pixels, an aspect ratio of 20000.*max_aspect_ratio=16"):
        read_image(strip, 1)
    assert read_image(strip, 1, max_aspect_ratio=None).shape == (1, 1, 20000)
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(UnreadableImageError, match="more than max_pixels=1,000,000"):
        read_image(big, 1, max_pixels=1_000_000)


def test_the_folder_dataset_applies_its_limits_and_skip_replaces_the_image(tmp_path):
    from difflab.data import ImageCaptionDataModule

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(9):
        Image.new("L", (8, 8), 20 * i).save(folder / f"{i}.png")
    Image.new("L", (20000, 1)).save(folder / "strip.png")
    dataset = ImageFolder(tmp_path / "images", image_size=8, channels=1)
    index = next(i for i, item in enumerate(dataset.items) if item[0].name == "strip.png")
    with pytest.raises(UnreadableImageError, match="strip.png"):
        dataset[index]
    data = ImageCaptionDataModule(dataset=dataset, batch_size=5, val_fraction=0.5, on_error="skip",
                                  max_skip_fraction=0.5, num_classes=1)
    data.setup("fit")
    batches = [*data.train_dataloader(), *data.val_dataloader()]  # the strip is in one of them, replaced
    assert sum(len(b["image"]) for b in batches) == 10 and all(b["image"].shape[1:] == (1, 8, 8) for b in batches)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    assert read_image(path, 1).flatten().tolist() == [0, 1, 128, 255]
    assert read_image(path, 3)[:, 0, 2].tolist() == [128, 128, 128]


def write_metadata(root, *lines):
    root.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8)).save(root / "a.png")
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("line,expected", [
    (json.dumps({"file_name": "/etc/hostname", "text": "x"}), "is outside"),
    (json.dumps({"file_name": "../secret.png", "text": "x"}), "is outside"),
    (json.dumps({"file_name": "sub/../../secret.png", "text": "x"}), "is outside"),
    ("[1, 2]", 'expected an object with a "file_name" string'),
    ('{"text": "no file"}', 'expected an object with a "file_name" string'),
    ("{not json", "not JSON"),
])
def test_metadata_lines_that_leave_the_folder_or_are_not_records_are_named(tmp_path, line, expected):
    root = write_metadata(tmp_path / "data", json.dumps({"file_name": "a.png", "text": "ok"}), line)
    with pytest.raises(UsageError, match=rf"metadata.jsonl:2: .*{expected}"):
        FolderLayout.read(root)


def test_metadata_inside_the_folder_is_read(tmp_path):
    root = write_metadata(tmp_path / "data", json.dumps({"file_name": "./a.png", "text": "a caption"}))
    layout = FolderLayout.read(root)
    assert [(p.name, text) for p, _, text in layout.items] == [("a.png", "a caption")]


def test_caches_of_a_folder_go_stale_when_its_files_change(tmp_path):
    """The FID real-statistics cache (and the latent cache, keyed the same way) follow the files, not the name."""
    import os
    from types import SimpleNamespace

    from torch.utils.data import Subset

    from difflab.lightning.fid import FIDCallback
    from difflab.metrics.features import dataset_key

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), 30 * i).save(folder / f"{i}.png")

    def fid_cache_path():
        train_set = Subset(ImageFolder(tmp_path / "images", image_size=8, channels=1), range(3))
        trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=train_set, image_size=8, split_seed=0),
                                  default_root_dir=str(tmp_path / "run"))
        return FIDCallback(SimpleNamespace(name="digit"), num_samples=3)._cache_path(trainer), dataset_key(train_set)

    first, key = fid_cache_path()
    assert key.startswith("imagefolder_images_") and fid_cache_path()[0] == first  # the same files: the same key
    Image.new("L", (8, 8), 255).save(folder / "1.png")  # replaced: same name, new bytes
    os.utime(folder / "1.png", ns=(10**9, 10**9))
    replaced = fid_cache_path()[0]
    assert replaced != first
    Image.new("L", (8, 8), 255).save(folder / "4.png")  # added
    assert fid_cache_path()[0] not in (first, replaced)


def test_channels_auto_passes_over_unreadable_files_under_skip(tmp_path):
    from omegaconf import OmegaConf

    from difflab.data.layout import resolve_folder_config

    (tmp_path / "digits").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "digits" / f"{i}.png")
    (tmp_path / "digits" / "empty.png").write_bytes(b"")  # 0 bytes: unreadable

    def resolved(on_error: str):
        data = OmegaConf.create({"root": str(tmp_path), "channels": "auto", "num_classes": "auto",
                                 "on_error": on_error})
        resolve_folder_config(data)
        return data

    assert resolved("skip").channels == 1  # the readable files vote; training skips and counts the empty one
    with pytest.raises(OSError, match="cannot read image .*empty.png"):
        resolved("raise")
    for path in (tmp_path / "digits").glob("[0-9].png"):
        path.write_bytes(b"")
    with pytest.raises(UsageError, match="none of the 4 images in .* can be read"):
        resolved("skip")
