"""python -m difflab.export: runs exported as folders that difflab.load, diffusers' pipelines and the Hub read, with
the same samples as the checkpoint; LoRA merged; the push path up to the upload call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from configs import make_cfg, sample_cfg
from difflab.cli.sample import sample
from difflab.cli.train import run
from difflab.diffusion.samplers import get_sampler
from difflab.errors import UsageError
from difflab.export import export
from difflab.loading import load, load_model, load_module
from network_contract import randomize

diffusers = pytest.importorskip("diffusers")

TINY_UNET = ("network=diffusers_unet", "+network.config={block_out_channels: [8, 16], norm_num_groups: 4, "
             "attention_head_dim: 4, down_block_types: [DownBlock2D, AttnDownBlock2D], "
             "up_block_types: [AttnUpBlock2D, UpBlock2D]}")


def train(tmp_path, *overrides):
    """A checkpoint after two training steps, its EMA network given random weights (a two-step EMA is nearly the
    initialisation, whose zeroed output layers would make every sampler agree)."""
    trainer = run(make_cfg(tmp_path, "trainer.max_steps=2", *overrides))
    randomize(trainer.lightning_module.ema)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def noise_and_generators(n, shape, seed=0):
    """diffusers' per-sample generators and the noise they draw (randn_tensor draws one sample per generator)."""
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + k)) for k in range(n)])
    return noise, [torch.Generator().manual_seed(seed + k) for k in range(n)]


@pytest.mark.parametrize("sampler,pipeline_class,steps", [("ddim", "DDIMPipeline", 5),
                                                         ("dpmpp_2m", "DDPMPipeline", 6),
                                                         ("unipc", "DDPMPipeline", 6)])  # falls back to DPM++
def test_an_exported_pixel_run_samples_in_diffusers_as_in_difflab(tmp_path, sampler, pipeline_class, steps):
    ckpt = train(tmp_path, *TINY_UNET, "conditioning=none", f"sampler={sampler}")
    out = export(ckpt, tmp_path / "exported")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == pipeline_class
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == pipeline_class
    noise, generators = noise_and_generators(3, (1, 8, 8))
    theirs = pipe(batch_size=3, generator=generators, num_inference_steps=steps, output_type="pt").images
    pipe = load(ckpt, device="cpu")
    fallback = get_sampler("dpmpp_2m", timestep_spacing=pipe.sampler.timestep_spacing)  # on the run's grid
    ours = pipe(noise=noise, steps=steps, progress=False, sampler=fallback if sampler == "unipc" else None)
    assert theirs.shape == ours.shape == (3, 1, 8, 8)
    assert (theirs - ours).abs().max() <= 1e-4
    assert 0.05 < ours.std()  # images, not a constant


@pytest.fixture(scope="module")
def class_ckpt(tmp_path_factory):
    """The default recipe shrunk: difflab's own UNet, class-conditional."""
    return train(tmp_path_factory.mktemp("class"))


def test_difflab_networks_export_as_safetensors_and_load_back(class_ckpt, tmp_path, monkeypatch):
    from difflab.nn import UNet

    with pytest.raises(UsageError, match="network=diffusers_unet"):
        export(class_ckpt, tmp_path / "refused", format="diffusers")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
    umask = os.umask(0o022)
    try:
        out = export(class_ckpt, tmp_path / "exported")  # format: safetensors, as diffusers cannot take it
    finally:
        os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.rglob("*") if p.is_file())  # shareable
    assert json.loads((out / "difflab.json").read_text())["format"] == "safetensors"
    assert not (out / "model_index.json").exists()
    module, exported = load_module(class_ckpt), load_model(out)
    # the network through PyTorchModelHubMixin: config.json + model.safetensors, equal to the EMA weights
    network = UNet.from_pretrained(out / "unet")
    for name, tensor in module.ema.state_dict().items():
        assert torch.equal(network.state_dict()[name], tensor), name
        assert torch.equal(exported.network.state_dict()[name], tensor), name
    expected = load(class_ckpt, device="cpu")(n=2, label=[3, 7], seed=0, steps=3, progress=False)
    got = load(out, device="cpu")(n=2, label=[3, 7], seed=0, steps=3, progress=False)
    assert torch.equal(got, expected)
    # sample.py reads the folder as it reads a checkpoint
    monkeypatch.chdir(tmp_path)  # and, without out=, writes to ./generated/<folder name>, not into the folder
    written = sample(sample_cfg(f"ckpt={out}", "n=2", "label=5", "steps=2", "progress=false"))
    assert len(sorted(written.glob("*_seed*.png"))) == 2
    assert written.resolve().parent == tmp_path / "generated" / "exported"


def test_a_dit_exports_to_a_transformer_folder(tmp_path):
    from difflab.nn import DiT

    ckpt = train(tmp_path, "network=dit_tiny")
    out = export(ckpt, tmp_path / "exported")
    network = DiT.from_pretrained(out / "transformer")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(network(x, t, class_labels=labels),
                               load_module(ckpt).ema(x, t, class_labels=labels), atol=0, rtol=0)


def test_lora_adapters_are_merged_at_export(tmp_path):
    base = train(tmp_path / "base")
    lora = train(tmp_path / "lora", "finetune=lora", f"finetune.base={base}", "finetune.rank=2")
    out = export(lora, tmp_path / "exported")
    exported = load_model(out)
    assert exported.run_config["model"]["finetune"] is None
    assert not [name for name in exported.state_dict() if "lora_" in name]
    expected = load(lora, device="cpu")(n=2, seed=0, steps=3, progress=False)
    got = load(out, device="cpu")(n=2, seed=0, steps=3, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_an_existing_folder_is_kept(class_ckpt, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="overwrite=true"):
        export(class_ckpt, out)
    assert (out / "mine.txt").read_text() == "keep me"
    export(class_ckpt, out, overwrite=True)
    assert (out / "difflab.json").is_file() and not (out / "mine.txt").exists()


def test_push_to_hub_uploads_the_folder_and_keeps_it_on_failure(class_ckpt, tmp_path):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create_repo"] = (repo_id, private, exist_ok)
            return mock.Mock(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["upload_folder"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))
            return f"https://huggingface.co/{repo_id}/commit/0"

    with mock.patch("huggingface_hub.HfApi", FakeApi):
        export(class_ckpt, tmp_path / "exported", push_to_hub="someone/digits", private=True)
    assert calls["create_repo"] == ("someone/digits", True, True)
    assert calls["upload_folder"][0] == "someone/digits"
    assert {"difflab.json", "unet", "README.md"} <= set(calls["upload_folder"][1])

    class OfflineApi(FakeApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("no network")

    with mock.patch("huggingface_hub.HfApi", OfflineApi), pytest.raises(UsageError, match="hf upload"):
        export(class_ckpt, tmp_path / "again", push_to_hub="someone/digits")
    assert (tmp_path / "again" / "difflab.json").is_file()


def test_load_takes_a_hub_repository(class_ckpt, tmp_path):
    out = export(class_ckpt, tmp_path / "exported")
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(out)) as download:
        pipe = load("someone/digits", device="cpu")
    download.assert_called_once_with("someone/digits")
    assert pipe.image_shape == (1, 8, 8)


def test_the_command_line_exports(class_ckpt, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "difflab.export", f"ckpt={class_ckpt}", f"out={tmp_path / 'cli'}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli" / "unet" / "model.safetensors").is_file()
    result = subprocess.run([sys.executable, "-m", "difflab.export", f"ckpt={class_ckpt}", f"out={tmp_path / 'cli'}"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "overwrite=true" in result.stderr.strip().splitlines()[-1]


def test_a_folder_that_is_not_an_export_is_refused_naming_what_it_is(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(UsageError, match="diffusers pipeline.*network.pretrained=DIR"):
        load_model(tmp_path / "pipeline")
    (tmp_path / "other").mkdir()
    with pytest.raises(UsageError, match="without difflab.json"):
        load_model(tmp_path / "other")
