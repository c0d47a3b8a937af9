"""data=huggingface on datasets built in the test (no network): a labelled one written with save_to_disk, a captioned
one as parquet files; training runs on both, labels and captions reach the batches, a bad image names its row."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from configs import make_cfg
from difflab.cli.train import run
from difflab.data.images import UnreadableImageError
from difflab.training import build

datasets = pytest.importorskip("datasets")
NAMES = ["circle", "square", "triangle"]


def png(value: int, size: int = 12) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size + 4), (value, 255 - value, 40)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "shapes"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    rows = {"image": [png(20 * k) for k in range(30)], "label": [k % 3 for k in range(30)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_parquet")
    features = datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")})
    rows = {"picture": [png(8 * k) for k in range(24)], "text": [f"a {c} thing" for c in ["red", "blue"] * 12]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder / "train.parquet"


QUICK = ["data=huggingface", "data.image_size=8", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2",
         "sampler.num_steps=2"]


def test_a_labelled_dataset_trains_with_its_class_names(labelled, tmp_path):
    cfg = make_cfg(tmp_path, *QUICK, f"data.path={labelled}", "data.label_column=label")
    model, datamodule, _ = build(cfg)
    assert cfg.data.num_classes == 3 and list(cfg.data.class_names) == NAMES  # from the ClassLabel
    item = datamodule.train_set[0]
    assert item["image"].shape == (3, 8, 8) and -1 <= item["image"].min() and item["image"].max() <= 1
    row = datamodule.train_set.indices[0]
    assert item["label"] == row % 3 and item["caption"] == f"a photo of a {NAMES[row % 3]}"
    # the pixels are the stored image's: row 0 is (0, 255, 40) everywhere
    first = datamodule.dataset[0]["image"]
    torch.testing.assert_close(first[:, 0, 0], torch.tensor([0, 255, 40]) / 127.5 - 1)
    trainer = run(make_cfg(tmp_path / "run", *QUICK, f"data.path={labelled}", "data.label_column=label"))
    assert trainer.global_step == 2 and trainer.lightning_module.diffusion_model().pipeline().class_names == NAMES


def test_a_captioned_parquet_dataset_trains_text_conditioned(captioned, tmp_path):
    common = [*QUICK, "data.path=parquet", f"data.dataset.data_files=[{captioned}]", "data.image_column=picture",
              "data.caption_column=text", "conditioning=text"]
    _, datamodule, _ = build(make_cfg(tmp_path, *common))
    assert datamodule.num_classes is None
    assert {datamodule.dataset[k]["caption"] for k in range(4)} == {"a red thing", "a blue thing"}
    assert run(make_cfg(tmp_path / "run", *common)).global_step == 2


def test_a_bad_image_names_its_row_and_skip_replaces_it(tmp_path):
    folder = tmp_path / "bad"
    rows = {"image": [png(10 * k) for k in range(12)], "label": [0] * 12}
    rows["image"][5] = {"bytes": b"not a png", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    _, datamodule, _ = build(make_cfg(tmp_path, *QUICK, f"data.path={folder}", "data.label_column=label"))
    assert datamodule.num_classes == 1  # an integer column: the largest label + 1
    with pytest.raises(UnreadableImageError, match=f"cannot read image {folder}\\[5\\]"):
        datamodule.dataset[5]
    cfg = make_cfg(tmp_path / "skip", *QUICK, f"data.path={folder}", "data.label_column=label", "data.on_error=skip",
                   "data.max_skip_fraction=0.5")
    assert run(cfg).global_step == 2


def test_a_missing_column_is_named_in_one_line(labelled, tmp_path):
    from difflab.cli.errors import user_error_message

    with pytest.raises(Exception) as info:  # Hydra's instantiate wraps the UsageError: the CLI prints its cause
        build(make_cfg(tmp_path, *QUICK, f"data.path={labelled}", "data.caption_column=text"))
    assert user_error_message(info.value) == f"data.caption_column=text: {labelled} has the columns ['image', 'label']"
