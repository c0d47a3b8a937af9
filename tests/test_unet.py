"""The UNet: every time embedding x injection, t-dependence, context masking, classes, presets."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.nn import TIME_EMBEDDINGS, TIME_INJECTIONS, UNet
from network_contract import check_cond_vector_matters, check_null_class, check_padded_context_is_ignored, randomize

CONF = Path(__file__).resolve().parents[1] / "src" / "difflab" / "conf" / "network"
# pinned parameter counts of the presets (base is the DDPM CIFAR-10 model, 35.7M in Ho et al. 2020)
PRESET_PARAMETERS = {"tiny": 189_985, "small": 716_161, "base": 35_741_699, "ldm": 9_786_628}


def tiny(**kwargs) -> UNet:
    cfg = dict(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
               num_heads=2, norm_groups=8)
    cfg.update(kwargs)
    return UNet(**cfg)


@pytest.mark.parametrize("time_embedding,time_injection", list(itertools.product(TIME_EMBEDDINGS, TIME_INJECTIONS)))
@pytest.mark.parametrize("size,channels", [(32, 1), (28, 1), (8, 4)])
def test_every_combination_runs_forward_and_backward(time_embedding, time_injection, size, channels):
    model = tiny(in_channels=channels, time_embedding=time_embedding, time_injection=time_injection)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer: a stable start
    out.square().add(out).sum().backward()
    assert all(p.grad is not None for p in model.out[-1].parameters())
    randomize(model)
    t_a, t_b = torch.tensor([10, 10]), torch.tensor([900, 900])
    assert not torch.allclose(model(x, t_a), model(x, t_b))  # the output depends on t


def test_padded_context_tokens_do_not_change_the_output():
    check_padded_context_is_ignored(randomize(tiny(in_channels=4, context_dim=12, attention_resolutions=(1, 2))))


def test_null_class_differs_from_real_classes():
    check_null_class(randomize(tiny(num_classes=10)))


def test_conditioning_vector_is_added_to_the_embedding():
    check_cond_vector_matters(randomize(tiny(cond_dim=5)))


def test_gradient_checkpointing_and_channels_last_are_exact():
    reference = randomize(tiny())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    out = reference(x, t)
    out.sum().backward()
    for kwargs in (dict(gradient_checkpointing=True), dict(channels_last=True)):
        model = tiny(**kwargs)
        model.load_state_dict(reference.state_dict())
        other = model(x, t)
        torch.testing.assert_close(other, out, atol=1e-5, rtol=1e-5)
        other.sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_bad_options_list_valid_ones():
    with pytest.raises(ValueError, match="valid: add, concat, film, adagn"):
        tiny(time_injection="scale")
    with pytest.raises(ValueError, match="valid: sinusoidal, learned, sinusoidal_mlp"):
        tiny(time_embedding="fourier")
    with pytest.raises(ValueError, match="divisible"):
        tiny(num_heads=3)


@pytest.mark.parametrize("preset", list(PRESET_PARAMETERS))
def test_presets_instantiate_with_pinned_parameter_counts(preset):
    channels = 3 if preset == "base" else 1  # the pixel presets read data.channels (MNIST: 1; base's counts: RGB)
    root = OmegaConf.create({"data": {"channels": channels}, "network": OmegaConf.load(CONF / f"{preset}.yaml")})
    model = instantiate(root.network)
    count = sum(p.numel() for p in model.parameters())
    print(f"network={preset}: {count:,} parameters")
    assert count == PRESET_PARAMETERS[preset]
    if preset == "tiny":
        assert count < 200_000
    size = 8 if preset == "ldm" else 32
    x = torch.randn(1, model.in_channels, size, size)
    kwargs = {"context": torch.randn(1, 4, model.context_dim)} if model.context_dim else {}
    with torch.no_grad():
        assert model(x, torch.tensor([10]), **kwargs).shape == x.shape


@pytest.mark.parametrize("channels,heads,size", [(64, 8, 16), (32, 1, 8), (24, 3, 5)])
def test_channels_first_attention_matches_sdpa(channels, heads, size):
    """The CPU attention path (ChannelsFirstAttention) computes the same function and gradients as SDPA."""
    from difflab.nn import SelfAttentionBlock

    torch.manual_seed(0)
    block = SelfAttentionBlock(channels, heads, groups=8).double()
    torch.nn.init.normal_(block.proj.weight, std=0.1)  # the zero-initialised projection would hide the attention
    x = torch.randn(3, channels, size, size, dtype=torch.float64, requires_grad=True)
    results = []
    for implementation in ("sdpa", "channels_first"):
        block.implementation = implementation
        out = block(x)
        grads = torch.autograd.grad((out * torch.cos(out)).sum(), [x, *block.parameters()])
        results.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-9, atol=1e-10)


def test_channels_first_attention_chunks_agree_with_one_chunk(monkeypatch):
    """Heads processed in chunks (the cache-sized loop) give what one chunk of all heads gives."""
    from difflab.nn import attention

    torch.manual_seed(0)
    qkv = torch.randn(10, 3 * 4, 36, dtype=torch.float64, requires_grad=True)
    results = []
    for chunk in (3, 10):
        monkeypatch.setattr(attention, "_chunk_size", lambda queries, keys, chunk=chunk: chunk)
        out = attention.ChannelsFirstAttention.apply(qkv, 0.5)
        results.append((out, torch.autograd.grad(out.square().sum(), qkv)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)


def test_kept_probabilities_give_the_recomputed_gradients_even_when_a_block_runs_twice():
    """The probability store (reused buffer) and the recomputing backward agree, also when one block runs twice
    in a graph (the second forward must not overwrite what the first one's backward reads)."""
    import copy
    import pickle

    from difflab.nn import SelfAttentionBlock

    torch.manual_seed(0)
    block = SelfAttentionBlock(16, 2, groups=8, implementation="channels_first").double()
    torch.nn.init.normal_(block.proj.weight, std=0.3)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for budget in (1 << 30, 0):  # kept, recomputed
        block.probability_store.budget_bytes = budget
        out = block(block(x))
        results.append(torch.autograd.grad(out.square().sum(), [x, *block.parameters()]))
    for kept, recomputed in zip(*results, strict=True):
        torch.testing.assert_close(kept, recomputed, rtol=0, atol=1e-12)
    store = block.probability_store
    store.budget_bytes = 1 << 30
    block(x).sum().backward()
    buffer = store.buffer
    assert buffer is not None and store.borrower is None  # returned by the backward
    out = block(x)
    del out  # a graph freed without a backward returns the buffer too
    block(x).sum().backward()
    assert store.buffer is buffer  # allocated once, reused
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):  # EMA copies, spawn
        assert clone.probability_store.buffer is None


def test_unknown_attention_implementation_lists_valid_ones():
    from difflab.nn import SelfAttentionBlock

    with pytest.raises(ValueError, match="'auto', 'sdpa', 'channels_first'"):
        SelfAttentionBlock(8, 1, groups=8, implementation="flash")


def test_encoder_only_unet_is_a_time_conditioned_classifier():
    torch.manual_seed(0)
    net = UNet(in_channels=1, out_channels=10, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(2,), num_heads=2, norm_groups=8, decoder=False)
    assert len(net.up) == 0
    for p in net.parameters():  # the zero-initialised residual branches would hide the time dependence
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 1, 32, 32)
    logits = net(x, torch.tensor([0, 500, 999]))
    assert logits.shape == (3, 10)
    assert not torch.allclose(net(x, torch.tensor([999, 500, 0])), logits)  # depends on t


@pytest.mark.parametrize("model_channels", [8, 16])
@pytest.mark.parametrize("time_embedding,time_injection", list(itertools.product(TIME_EMBEDDINGS, TIME_INJECTIONS)))
def test_every_injection_responds_to_t_at_narrow_widths_with_the_default_norm_groups(time_embedding, time_injection,
                                                                                     model_channels):
    # norm_groups=32 (the default) on 8 / 16 / 32 channels is one channel per group: add's W emb, put before that
    # norm, would be removed by it and the network would be blind to t
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=model_channels, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_heads=2, time_embedding=time_embedding, time_injection=time_injection)
    with torch.no_grad():  # as after some training: the zero-initialised layers are no longer zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 1, 16, 16)
        change = (model(x, torch.tensor([10, 10])) - model(x, torch.tensor([900, 900]))).abs().max()
    assert change > 1e-3, change
