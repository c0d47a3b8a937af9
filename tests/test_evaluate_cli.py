"""evaluate.py: FID of a checkpoint's samples or of a folder, next to the real-vs-real floor, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from configs import compose_config, make_cfg, sample_cfg
from difflab.cli import CONFIG_DIR
from difflab.cli.evaluate import evaluate, main, report
from difflab.cli.sample import sample
from difflab.cli.train import run


def eval_cfg(*overrides: str):
    return compose_config("evaluate", *overrides)


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_run")
    run(make_cfg(tmp, "trainer.max_steps=2", "sampler.num_steps=2"))  # the default: class-conditional
    return tmp / "checkpoints" / "last.ckpt"


def test_checkpoint_fid_with_floor_and_class_accuracy(class_checkpoint):
    result = evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=20", "steps=2", "batch_size=8", "progress=false"))
    assert result["n"] == 20 and result["extractor"] == "digit_classifier"
    assert result["fid"] > result["fid_real_vs_real"] >= 0  # an untrained model is far from the data
    assert result["fid_real_vs_real_n"] == 20
    assert 0 <= result["class_accuracy"] <= 1 and result["sampler"]["num_steps"] == 2
    assert "real vs real floor (n=20)" in report(result)
    assert result["kid"] > result["kid_real_vs_real"] and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert 1 <= result["inception_score"] <= 10  # over the digit classifier's 10 classes
    with pytest.raises(ValueError, match="unknown metrics \\['fd'\\]; valid: fid, kid, prc, isc"):
        evaluate(eval_cfg(f"ckpt={class_checkpoint}", "n=20", "steps=2", "metrics=[fd]", "progress=false"))


def test_samples_folder_and_json(class_checkpoint, tmp_path):
    out = sample(sample_cfg(f"ckpt={class_checkpoint}", "n=12", "steps=2", f"out={tmp_path / 'gen'}",
                            "progress=false"))
    result = evaluate(eval_cfg(f"samples={out}", "data=digits", "n=12", "progress=false"))
    assert result["samples"] == str(out) and result["fid"] > 0 and "class_accuracy" not in result
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
    if option == "inception":
        pytest.importorskip("torch_fidelity")
    cfg = eval_cfg(f"extractor={option}", *([f"extractor.cache_dir={tmp_path}"] if option == "inception" else []))
    extractor = instantiate(cfg.extractor)
    features = extractor(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert features.shape == (2, extractor.dim) and extractor.name in ("digit_classifier", "inception")
