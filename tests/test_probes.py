"""difflab.probe: each probe against a network whose answer is known (a t-blind block, a fake class network, the
exact Bayes denoiser, a query-less attention), the CLI and the training callback."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from configs import compose_config, make_cfg
from difflab import probe
from difflab.cli.probe import main as probe_main
from difflab.cli.probe import run_probe
from difflab.cli.train import run
from difflab.conditioning import ClassConditioner, TextConditioner
from difflab.data.gmm import GaussianMixture
from difflab.diffusion import NoiseSchedule, get_prediction, get_sampler
from difflab.errors import UsageError
from difflab.model import DiffusionModel
from difflab.nn import DiT, UNet
from difflab.nn.unet import ResBlock
from difflab.pipeline import Pipeline

SIZE = 16


def pipeline(network: nn.Module, conditioner=None, prediction: str = "epsilon") -> Pipeline:
    return DiffusionModel(network, NoiseSchedule.linear(1000), get_prediction(prediction),
                          get_sampler("ddim", num_steps=3), conditioner, image_shape=(1, SIZE, SIZE)).pipeline()


def perturbed_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    net = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
               num_heads=2, **kwargs)
    with torch.no_grad():  # the zero-initialised output convolutions would hide every response
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def image_batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1, "label": torch.arange(n) % 10,
            "caption": ["a handwritten digit"] * n}


# ---- t_response --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("injection", ["add", "film"])
def test_every_block_of_a_perturbed_network_responds_to_t(injection):
    result = probe.t_response(pipeline(perturbed_unet(time_injection=injection)), image_batch(), reference_t=500,
                              timesteps=[10, 300, 500, 900])
    blocks = [name for name, m in perturbed_unet(time_injection=injection).named_modules() if isinstance(m, ResBlock)]
    assert result.blocks == [*blocks, "output"] and result.time_injection == injection
    assert result.time_embedding == "sinusoidal_mlp"
    assert (result.spread > 1e-3).all(), result.table()
    assert torch.equal(result.change[:, 2], torch.zeros(len(result.blocks), dtype=torch.float64))  # t = reference_t
    assert (result.change[:, [0, 1, 3]] > 0).all()


def test_every_block_of_a_perturbed_dit_responds_to_t():
    torch.manual_seed(0)
    net = DiT(in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2, frequency_dim=32)
    with torch.no_grad():  # adaLN-Zero's zero gates would hide every response
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = probe.t_response(pipeline(net), image_batch(), reference_t=500, timesteps=[10, 300, 500, 900])
    assert result.blocks == ["blocks.0", "blocks.1", "output"] and result.time_injection == "adaln_zero"
    assert result.time_embedding == "sinusoidal_mlp"
    assert (result.spread > 1e-3).all(), result.table()


def test_a_t_blind_network_is_reported_blind():
    """The old add bug, rebuilt: norm2 with one channel per group removes the added embedding in every block."""
    net = perturbed_unet(time_injection="add")
    for module in net.modules():
        if isinstance(module, ResBlock):
            channels = module.norm2.num_channels
            module.norm2 = nn.GroupNorm(channels, channels)
    result = probe.t_response(pipeline(net), image_batch())
    assert (result.spread < 1e-5).all(), result.table()
    assert result.scalars()["t_spread_mean"] < 1e-5


# ---- cfg_gap -----------------------------------------------------------------------------------------------------


class LabelNetwork(nn.Module):
    """eps = label / 10 everywhere, whatever x and t: the null class (10) predicts 1, so |gap| = |label / 10 - 1|."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the pipeline a device

    def forward(self, x, t, class_labels):
        return (class_labels.to(x.dtype) / 10)[:, None, None, None].expand_as(x) + self.anchor


def test_the_guidance_gap_of_a_known_network():
    batch = image_batch(n=4)  # labels 0, 1, 2, 3
    result = probe.guidance_gap(pipeline(LabelNetwork(), ClassConditioner(10)), batch, timesteps=[0, 400, 999])
    expected = (1 - batch["label"].double() / 10).mean()  # 1, 0.9, 0.8, 0.7 -> 0.85
    torch.testing.assert_close(result.gap, expected.expand(3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.relative, expected.expand(3), rtol=1e-6, atol=1e-6)  # eps(null) has rms 1
    assert result.timesteps == [0, 400, 999]


def test_the_guidance_gap_needs_a_condition():
    with pytest.raises(UsageError, match="conditional model"):
        probe.guidance_gap(pipeline(perturbed_unet()), image_batch())


# ---- bayes_gap ---------------------------------------------------------------------------------------------------

MIXTURE = GaussianMixture((0.3, 0.7), (-0.8, 0.5), (0.2, 0.3))


class BayesNetwork(nn.Module):
    """The optimal predictor of MIXTURE's pixels in ``prediction``'s space, plus ``offset``."""

    def __init__(self, prediction: str = "epsilon", offset: float = 0.0):
        super().__init__()
        self.schedule, self.prediction, self.offset = NoiseSchedule.linear(1000), get_prediction(prediction), offset
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the pipeline a device

    def forward(self, x, t):
        x = x.double()
        alpha, sigma = self.schedule.alpha_sigma(t, x)
        x0 = MIXTURE.posterior_mean(x, alpha, sigma)
        best = self.prediction.target(x0, (x - alpha * x0) / sigma, alpha, sigma)
        return (best + self.offset).float() + self.anchor


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_the_bayes_denoiser_has_no_excess(prediction):
    result = probe.bayes_gap(pipeline(BayesNetwork(prediction), prediction=prediction), MIXTURE, n=64, buckets=5)
    assert result.edges == [0, 200, 400, 600, 800, 1000] and result.prediction == prediction
    assert (result.excess < 1e-6).all(), result.table()
    assert (result.bayes > 0).all()
    torch.testing.assert_close(result.loss, result.bayes, rtol=1e-4, atol=1e-6)


def test_an_offset_of_delta_costs_delta_squared():
    delta = 0.1
    result = probe.bayes_gap(pipeline(BayesNetwork(offset=delta)), MIXTURE, n=256, buckets=4)
    torch.testing.assert_close(result.excess, torch.full((4,), delta**2, dtype=torch.float64), rtol=1e-3, atol=0)
    # loss - bayes = excess + a zero-mean cross term: 3 standard errors of 2 delta sqrt(bayes / pixels)
    tolerance = 3 * 2 * delta * (result.bayes / (256 * SIZE * SIZE)).sqrt()
    assert ((result.loss - result.bayes - result.excess).abs() < tolerance).all(), result.table()


def test_bayes_gap_needs_gmm_data():
    with pytest.raises(UsageError, match="data=gmm"):
        probe.mixture_of({"data": {"dataset": {"_target_": "difflab.data.digits.digits"}}})
    mixture = probe.mixture_of({"data": {"dataset": {"_target_": "difflab.data.gmm.gmm", "weights": [0.5, 0.5],
                                                     "means": [-1.0, 1.0], "stds": [0.1, 0.2]}}})
    assert mixture.means.tolist() == [-1.0, 1.0]


# ---- cross_attention ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_pipe():
    from difflab.conditioning import minilm

    conditioner = TextConditioner(minilm(), drop_prob=0.1)
    dim = conditioner.dim
    return pipeline(perturbed_unet(context_dim=dim, cond_dim=dim, norm_groups=8), conditioner)


def test_cross_attention_maps_are_distributions_over_the_prompt_tokens(text_pipe):
    images = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    result = probe.cross_attention(text_pipe, ["the digit seven", "a handwritten 0"], images=images,
                                   timesteps=[100, 700])
    assert result.tokens[0] == ["[CLS]", "the", "digit", "seven", "[SEP]"]
    assert result.tokens[1][0] == "[CLS]" and result.tokens[1][-1] == "[SEP]"
    for maps, tokens in zip(result.maps, result.tokens, strict=True):
        assert maps.shape == (len(tokens), SIZE, SIZE)
        torch.testing.assert_close(maps.sum(0), torch.ones(SIZE, SIZE), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(result.maps[0], torch.full_like(result.maps[0], 1 / 5), atol=1e-3)


def test_without_queries_attention_is_uniform(text_pipe):
    network = text_pipe.network
    saved = {name: p.detach().clone() for name, p in network.named_parameters() if "cross_attn.to_q" in name}
    assert saved
    try:
        with torch.no_grad():
            for name, p in network.named_parameters():
                if name in saved:
                    p.zero_()
        result = probe.cross_attention(text_pipe, "the digit seven", images=torch.rand(1, 1, SIZE, SIZE))
    finally:
        with torch.no_grad():
            for name, p in network.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    torch.testing.assert_close(result.maps[0], torch.full((5, SIZE, SIZE), 1 / 5), rtol=1e-5, atol=1e-6)


def test_cross_attention_needs_text():
    with pytest.raises(UsageError, match="text-conditioned"):
        probe.cross_attention(pipeline(perturbed_unet()), "a 7", images=torch.rand(1, 1, SIZE, SIZE))


# ---- the CLI and the callback ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    run(make_cfg(tmp, "conditioning=class", "trainer.max_steps=2"))
    return tmp / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("name", ["t_response", "cfg_gap"])
def test_the_cli_writes_json_and_png(class_checkpoint, tmp_path, name, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["probe", f"ckpt={class_checkpoint}", f"probe={name}", "n=4",
                                     "timesteps=[10,500,900]", f"out={tmp_path}"])
    probe_main()
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["probe"] == name and record["timesteps"] == [10, 500, 900]
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| " in capsys.readouterr().out


def test_the_cli_refuses_what_does_not_apply(class_checkpoint):
    cfg = compose_config("probe", f"ckpt={class_checkpoint}", "probe=loss")
    with pytest.raises(UsageError, match="not a probe: valid: t_response"):
        run_probe(cfg)
    cfg = compose_config("probe", f"ckpt={class_checkpoint}", "probe=bayes_gap")
    with pytest.raises(UsageError, match="data=gmm"):
        run_probe(cfg)
    cfg = compose_config("probe", f"ckpt={class_checkpoint}", "probe=cross_attention")
    with pytest.raises(UsageError, match="text-conditioned"):
        run_probe(cfg)


def test_the_callback_logs_probes_and_writes_figures(tmp_path):
    trainer = run(make_cfg(tmp_path, "callbacks=probes", "data=gmm", "conditioning=none", "data.dataset.n=64",
                           "callbacks.probes.every_n_steps=2", "callbacks.probes.num_images=2",
                           "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_samples=4"))
    assert trainer.global_step == 2
    for name in ("t_response", "bayes_gap"):
        assert (tmp_path / "probes" / name / "step_000002.png").is_file()
    assert not (tmp_path / "probes" / "cfg_gap").exists()  # unconditional: skipped
    logged = "".join(p.read_text() for p in tmp_path.rglob("metrics.csv"))
    assert "probe/t_spread_mean" in logged and "probe/bayes_excess_mean" in logged
