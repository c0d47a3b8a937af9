"""An image folder's layout read from the data: classes, their names and the images' channels, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from configs import SHAPES, make_cfg, sample_cfg, write_shapes
from difflab.cli.sample import sample
from difflab.cli.train import build, run
from difflab.data.layout import FolderLayout, resolve_folder_config


def folder_config(root, **values):
    base = {"root": str(root), "channels": "auto", "num_classes": "auto", "class_names": None}
    return OmegaConf.create({**base, **values})


def test_auto_reads_classes_names_and_channels(tmp_path):
    write_shapes(tmp_path / "rgb", per_class=2)
    data = folder_config(tmp_path / "rgb")
    resolve_folder_config(data)
    assert (data.channels, data.num_classes, list(data.class_names)) == (3, 3, list(SHAPES))
    write_shapes(tmp_path / "gray", per_class=2, mode="L")
    data = folder_config(tmp_path / "gray")
    resolve_folder_config(data)
    assert data.channels == 1


def test_explicit_values_win_and_too_few_classes_are_refused(tmp_path):
    write_shapes(tmp_path, per_class=2)
    data = folder_config(tmp_path, channels=1, num_classes=5, class_names=["square", "circle"])
    resolve_folder_config(data)
    assert (data.channels, data.num_classes, list(data.class_names)) == (1, 5, ["square", "circle"])
    assert FolderLayout.read(tmp_path, ["square", "circle"]).items[0][1:] == (0, "square")
    with pytest.raises(ValueError, match=r"data.num_classes=2 but .* has 3 class folders \(circle, square, triangle\)"):
        resolve_folder_config(folder_config(tmp_path, num_classes=2))
    with pytest.raises(ValueError, match=r"class folder\(s\) \['dog'\] not in"):
        FolderLayout.read(tmp_path, ["dog"])


def test_mixed_modes_are_refused_naming_an_example_of_each(tmp_path):
    write_shapes(tmp_path, per_class=2)
    Image.new("L", (16, 16), 128).save(tmp_path / "circle" / "gray.png")
    with pytest.raises(ValueError, match=r"mixes grayscale \(1, e.g. .*gray.png\) and colour \(6, e.g. .*\.png\) "
                                         r"images: set data.channels=1 or data.channels=3"):
        resolve_folder_config(folder_config(tmp_path))


def test_palette_images_are_gray_when_their_palette_is(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8), 100).convert("P").save(tmp_path / "a" / "gray.png")  # a palette of greys
    assert FolderLayout.read(tmp_path).channels() == 1
    Image.new("RGB", (8, 8), (200, 10, 10)).convert("P").save(tmp_path / "a" / "red.png")
    with pytest.raises(ValueError, match="mixes grayscale"):
        FolderLayout.read(tmp_path).channels()


def test_a_captioned_folder_is_unlabelled(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "black"}) + "\n")
    data = folder_config(tmp_path)
    resolve_folder_config(data)
    assert (data.channels, data.num_classes, data.class_names) == (3, None, None)


def test_class_conditional_training_from_the_folder_alone_and_sampling_by_name(tmp_path):
    """The acceptance run: only data=imagefolder data.root=DIR; the checkpoint knows the names; label=circle."""
    write_shapes(tmp_path / "shapes", per_class=8, size=12)
    cfg = make_cfg(tmp_path / "run", "data=imagefolder", f"data.root={tmp_path / 'shapes'}", "data.image_size=8",
                   "data.batch_size=8", "data.num_workers=0", "sampler.num_steps=2")
    run(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    data = checkpoint["difflab_config"]["data"]
    assert (data["channels"], data["num_classes"], data["class_names"]) == (3, 3, list(SHAPES))
    assert checkpoint["difflab_config"]["conditioning"]["class_names"] == list(SHAPES)
    out = sample(sample_cfg(f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "label=[circle,2]", "n=2",
                            "steps=2", f"out={tmp_path / 'gen'}", "progress=false"))
    names = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert names == ["circle_000_seed0.png", "circle_001_seed1.png", "label2_000_seed0.png", "label2_001_seed1.png"]
    with Image.open(out / "circle_000_seed0.png") as image:
        assert image.mode == "RGB" and image.size == (8, 8)
    from difflab import load

    pipe = load(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    assert pipe.class_names == list(SHAPES)
    by_name = pipe(n=2, label="square", steps=2, seed=0, progress=False)
    torch.testing.assert_close(by_name, pipe(n=2, label=1, steps=2, seed=0, progress=False), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown class 'hexagon'; its classes: circle, square, triangle"):
        pipe(n=1, label="hexagon", steps=2)


def test_mnist_models_have_no_names_and_say_so(tmp_path):
    model, _, _ = build(make_cfg(tmp_path))
    pipe = model.pipeline()
    assert pipe.class_names is None
    with pytest.raises(ValueError, match="unknown class 'seven'; it has no class names: ask with label=K, K in 0..9"):
        pipe(n=1, label="seven", steps=2)


def test_the_classifier_takes_the_folder_classes_and_refuses_unlabelled_data(tmp_path):
    write_shapes(tmp_path / "shapes", per_class=4, size=8)
    cfg = make_cfg(tmp_path / "run", "model=classifier", "conditioning=none", "data=imagefolder",
                   f"data.root={tmp_path / 'shapes'}", "data.image_size=8", "data.batch_size=4", "data.num_workers=0")
    model, datamodule, _ = build(cfg)
    assert model(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 3)
    (tmp_path / "captioned").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "captioned" / f"{i}.png")
    (tmp_path / "captioned" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": "black"}) + "\n" for i in range(4)))
    cfg = make_cfg(tmp_path / "run2", "model=classifier", "conditioning=none", "data=imagefolder",
                   f"data.root={tmp_path / 'captioned'}", "data.image_size=8", "data.batch_size=1",
                   "data.num_workers=0")
    with pytest.raises(Exception, match="model=classifier needs labelled data"):
        build(cfg)
