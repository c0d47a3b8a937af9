"""The DiT: the UNet's tests (every time embedding, t dependence, null class, padding-invariant text, 32x32 and
8x8x4), adaLN-Zero's identity start, the position embedding against diffusers', presets and training from config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from configs import make_cfg
from difflab.cli.train import run
from difflab.nn import TIME_EMBEDDINGS, DiT
from difflab.nn.dit import sincos_2d
from network_contract import check_cond_vector_matters, check_null_class, check_padded_context_is_ignored, randomize

CONF = Path(__file__).resolve().parents[1] / "src" / "difflab" / "conf" / "network"
# pinned parameter counts of the presets (dit_b: DiT-B/2, 130M in Peebles & Xie 2023, Table 1)
PRESET_PARAMETERS = {"dit_tiny": 43_172, "dit_s": 2_458_256, "dit_b": 129_507_088}


def tiny(**kwargs) -> DiT:
    cfg = dict(in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, frequency_dim=32)
    cfg.update(kwargs)
    return DiT(**cfg)


@pytest.mark.parametrize("time_embedding", list(TIME_EMBEDDINGS))
@pytest.mark.parametrize("size,channels", [(32, 1), (28, 1), (8, 4), (7, 3)])
def test_every_time_embedding_runs_forward_and_backward_and_depends_on_t(time_embedding, size, channels):
    model = tiny(in_channels=channels, time_embedding=time_embedding, patch_size=4 if size == 28 else 2)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer: a stable start
    out.square().add(out).sum().backward()
    assert all(p.grad is not None for p in model.final_layer.linear.parameters())
    randomize(model)
    assert not torch.allclose(model(x, torch.tensor([10, 10])), model(x, torch.tensor([900, 900])))
    if time_embedding == "learned":  # a fractional t (sigma grids) interpolates the table
        assert model(x, torch.tensor([10.5, 10.5], dtype=torch.float64)).shape == x.shape


def test_blocks_start_as_the_identity():
    """adaLN-Zero: every gate regresses to zero at initialisation, so each block passes its tokens through."""
    model = tiny(num_classes=10, context_dim=12)
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        torch.testing.assert_close(block(tokens, c, torch.randn(2, 3, 12)), tokens, atol=0, rtol=0)
    # with the output layer zero too, the first gradient reaches only that layer (DiT's initialisation)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), class_labels=torch.tensor([1, 2]))
    (out - torch.randn_like(out)).square().sum().backward()
    for name, p in model.named_parameters():
        learns = name.startswith("final_layer.linear.")
        assert (p.grad is not None and p.grad.abs().sum() > 0) == learns, name


def test_padded_context_tokens_do_not_change_the_output():
    check_padded_context_is_ignored(randomize(tiny(in_channels=4, context_dim=12)))


def test_null_class_differs_from_real_classes():
    check_null_class(randomize(tiny(num_classes=10)))


def test_conditioning_vector_is_added_to_the_embedding():
    check_cond_vector_matters(randomize(tiny(cond_dim=5)))


def test_every_patch_sees_its_own_pixels_and_position():
    """Patchify / unpatchify keep the layout: with one block, changing one patch changes mostly that patch, and the
    same content at two positions gives two outputs (the position embedding)."""
    model = randomize(tiny(depth=0, patch_size=4))  # embedding -> final layer only: no mixing between tokens
    x = torch.zeros(1, 1, 16, 16)
    x2 = x.clone()
    x2[..., 4:8, 8:12] = 1.0
    diff = (model(x2, torch.tensor([7])) - model(x, torch.tensor([7]))).abs()[0, 0]
    outside = diff.clone()
    outside[4:8, 8:12] = 0
    assert diff[4:8, 8:12].min() > 0 and outside.max() == 0  # not sum == sum: summation order rounds differently
    out = model(x, torch.tensor([7]))[0, 0]
    assert not torch.allclose(out[:4, :4], out[4:8, 4:8])


def test_gradient_checkpointing_is_exact():
    reference = randomize(tiny(num_classes=3))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    out = reference(x, t, class_labels=y)
    out.sum().backward()
    model = tiny(num_classes=3, gradient_checkpointing=True)
    model.load_state_dict(reference.state_dict())
    other = model(x, t, class_labels=y)
    torch.testing.assert_close(other, out)
    other.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dim,size", [(32, 4), (64, 8), (384, 16)])
def test_position_embedding_equals_diffusers(dim, size):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.models.embeddings.get_2d_sincos_pos_embed(dim, size, base_size=size, output_type="pt")
    torch.testing.assert_close(sincos_2d(dim, size, size), theirs.float(), atol=1e-6, rtol=1e-6)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="valid: sinusoidal, learned, sinusoidal_mlp"):
        tiny(time_embedding="fourier")
    with pytest.raises(ValueError, match="divisible"):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(hidden_size=30, num_heads=1)


@pytest.mark.parametrize("preset", list(PRESET_PARAMETERS))
def test_presets_instantiate_with_pinned_parameter_counts(preset):
    root = OmegaConf.create({"data": {"channels": 1}, "network": OmegaConf.load(CONF / f"{preset}.yaml")})
    model = instantiate(root.network)
    count = sum(p.numel() for p in model.parameters())
    print(f"network={preset}: {count:,} parameters")
    assert count == PRESET_PARAMETERS[preset]
    size = 32
    x = torch.randn(1, model.in_channels, size, size)
    with torch.no_grad():
        assert model(x, torch.tensor([10])).shape == x.shape


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_dit_trains_from_the_command_line(tmp_path, conditioning):
    trainer = run(make_cfg(tmp_path, "network=dit_tiny", f"conditioning={conditioning}"))
    network = trainer.lightning_module.network
    assert isinstance(network, DiT)
    assert (network.num_classes == 10) == (conditioning == "class")
    assert (network.context_dim is not None) == (conditioning == "text")
    if conditioning == "text":
        assert all(block.cross_attn is not None for block in network.blocks)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert (tmp_path / "samples").is_dir() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
