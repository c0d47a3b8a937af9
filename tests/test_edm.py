"""EDM (Karras et al. 2022): the log-uniform sigma schedule, the preconditioning in closed form, its loss, the
log-normal training levels, diffusers' EDMEulerScheduler, the mixture recovered, and experiment=mnist_edm."""

from __future__ import annotations

import math

import pytest
import torch

from analytic import MixtureDenoiser, ks_distance
from configs import make_cfg
from difflab.cli.train import run
from difflab.diffusion import (
    Denoiser,
    DiffusionLoss,
    EDMPrediction,
    LogNormalTimesteps,
    MinSNRWeighting,
    NoiseSchedule,
    VPrediction,
    get_sampler,
)

SIGMA_DATA = 0.5


@pytest.fixture
def schedule():
    return NoiseSchedule.edm()


def levels(n=64, seed=0):
    """VP (alpha, sigma) of n sigmas spread over EDM's range, shaped (n, 1)."""
    ve = torch.logspace(math.log10(0.002), math.log10(80.0), n, dtype=torch.float64)[:, None]
    return 1 / (1 + ve**2) ** 0.5, ve / (1 + ve**2) ** 0.5, ve


def test_schedule_is_log_uniform_in_sigma_and_t_is_affine_in_log_sigma(schedule):
    sigmas = schedule.sigmas
    assert float(sigmas[0]) == pytest.approx(0.002, rel=1e-12) and float(sigmas[-1]) == pytest.approx(80.0, rel=1e-9)
    torch.testing.assert_close(sigmas.log().diff(), torch.full((999,), math.log(40_000) / 999, dtype=torch.float64))
    sigma = torch.exp(torch.empty(100, dtype=torch.float64).uniform_(math.log(0.002), math.log(80.0)))
    expected = 999 * (sigma.log() - math.log(0.002)) / math.log(40_000)
    torch.testing.assert_close(schedule.sigma_to_t(sigma), expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(schedule.t_to_abar(expected), 1 / (1 + sigma**2), rtol=1e-9, atol=0)


def test_preconditioning_equals_table_1():
    """c_skip, c_out, c_in of Karras et al. 2022, Table 1, written in the variance-exploding frame."""
    alpha, sigma, ve = levels()
    g = torch.Generator().manual_seed(0)
    x_t, output = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g,
                                                                                   dtype=torch.float64)
    x_ve = x_t / alpha
    c_skip = SIGMA_DATA**2 / (ve**2 + SIGMA_DATA**2)
    c_out = ve * SIGMA_DATA / (ve**2 + SIGMA_DATA**2) ** 0.5
    c_in = 1 / (ve**2 + SIGMA_DATA**2) ** 0.5
    prediction = EDMPrediction(SIGMA_DATA)
    torch.testing.assert_close(prediction.scale_input(x_t, alpha, sigma), c_in * x_ve)
    x0, eps = prediction.to_x0_eps(output, x_t, alpha, sigma)
    torch.testing.assert_close(x0, c_skip * x_ve + c_out * output)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x_t)
    # the target is the output that denoises exactly, and it has unit variance for data of std sigma_data
    clean = SIGMA_DATA * torch.randn(64, 20_000, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 20_000, generator=g, dtype=torch.float64)
    target = prediction.target(clean, noise, alpha, sigma)
    torch.testing.assert_close(prediction.to_x0(target, alpha * clean + sigma * noise, alpha, sigma), clean)
    assert (target.std(dim=1) - 1).abs().max() < 0.03


def test_sigma_data_one_is_minus_v_prediction():
    alpha, sigma, _ = levels()
    g = torch.Generator().manual_seed(1)
    x_t, v = (torch.randn(64, 7, generator=g, dtype=torch.float64) for _ in range(2))
    edm, vpred = EDMPrediction(1.0), VPrediction()
    torch.testing.assert_close(edm.scale_input(x_t, alpha, sigma), x_t)
    for ours, theirs in zip(edm.to_x0_eps(-v, x_t, alpha, sigma), vpred.to_x0_eps(v, x_t, alpha, sigma),
                            strict=True):
        torch.testing.assert_close(ours, theirs)


def test_plain_mse_on_the_target_is_edms_weighted_loss(schedule):
    """Uniform weighting on F equals lambda(sigma) ||D(x; sigma) - x0||^2, lambda = (sigma^2 + s_d^2) / (sigma s_d)^2
    (Karras et al. 2022, Table 1); Min-SNR on F equals min(SNR, gamma) ||D - x0||^2."""
    x0 = torch.randn(32, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    noise = torch.randn_like(x0)
    t = torch.linspace(0, 999, 32, dtype=torch.float64)
    network = lambda x, t: torch.tanh(x) * 0.3 + 0.01 * t.reshape(-1, 1, 1, 1) / 1000
    prediction = EDMPrediction(SIGMA_DATA)
    alpha, sigma = schedule.alpha_sigma(t, x0)
    ve = sigma / alpha
    x_t = alpha * x0 + sigma * noise
    denoised = prediction.to_x0(network(prediction.scale_input(x_t, alpha, sigma), t), x_t, alpha, sigma)
    error = (denoised - x0).pow(2).flatten(1).mean(1)
    lam = ((ve**2 + SIGMA_DATA**2) / (ve * SIGMA_DATA) ** 2).flatten()
    out = DiffusionLoss("edm")(network, x0, schedule, t=t, noise=noise)
    torch.testing.assert_close(out.per_sample.double(), lam * error, rtol=1e-5, atol=0)
    snr = (1 / ve**2).flatten()
    out = DiffusionLoss("edm", MinSNRWeighting(5.0))(network, x0, schedule, t=t, noise=noise)
    torch.testing.assert_close(out.per_sample.double(), snr.clamp(max=5.0) * error, rtol=1e-5, atol=0)


def test_lognormal_levels(schedule):
    """log sigma(t) of the drawn t is N(-1.2, 1.2^2): KS distance within the DKW bound at delta = 1e-6."""
    n = 100_000
    t = LogNormalTimesteps()(n, schedule, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and 0 <= float(t.min()) and float(t.max()) <= 999
    sigma = ((1 - schedule.t_to_abar(t)) / schedule.t_to_abar(t)).sqrt()
    z = (sigma.log() + 1.2) / 1.2
    normal_cdf = lambda x: 0.5 * (1 + torch.erf(x / 2**0.5))
    assert ks_distance(z, normal_cdf) < math.sqrt(math.log(2 / 1e-6) / (2 * n))


def test_edm_euler_equals_diffusers(schedule):
    """The same network F(c_in x, c_noise) sampled by difflab (schedule=edm, prediction=edm, Euler on a Karras grid)
    and by diffusers' EDMEulerScheduler: difflab tells t, affine in log sigma, the test's network maps it back to
    EDM's c_noise = log(sigma) / 4."""
    diffusers = pytest.importorskip("diffusers")

    def network(x_in, c_noise):
        c = c_noise.reshape(-1, *[1] * (x_in.ndim - 1)).to(x_in.dtype)
        return torch.tanh(1.5 * x_in) * (0.8 + 0.1 * c) + 0.2 * c * x_in.roll(1, -1)

    def ours_network(x_in, t):  # t -> sigma -> c_noise
        abar = schedule.t_to_abar(t)
        return network(x_in, 0.25 * ((1 - abar) / abar).sqrt().log())

    scheduler = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA,
                                            sigma_schedule="karras", prediction_type="epsilon")
    scheduler.set_timesteps(12)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = network(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        x = scheduler.step(model_output, t, x).prev_sample
    sampler = get_sampler("euler", num_steps=12, sigma_schedule="karras")
    ours = sampler.sample(Denoiser(ours_network, schedule, "edm"), x_T)
    assert (ours - x.double()).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("heun", {"num_steps": 40}), ("dpmpp_2m", {"num_steps": 40})])
def test_edm_recovers_the_mixture(schedule, name, options):
    """The exact denoiser of a Gaussian mixture behind EDM's preconditioning, sampled on a Karras grid: KS distance
    within the DKW tolerance of tests/test_sampler_distribution.py."""
    from test_sampler_distribution import N_SAMPLES, TOLERANCE

    denoiser = MixtureDenoiser(schedule, "edm")
    sampler = get_sampler(name, sigma_schedule="karras", **options)
    g = torch.Generator().manual_seed(0)
    x_T = denoiser.marginal_sample(N_SAMPLES, 999, g).reshape(200, 500).float()
    samples = sampler.sample(denoiser.as_denoiser(), x_T, generator=g)
    assert ks_distance(samples, denoiser.cdf) <= TOLERANCE


def test_mnist_edm_preset_trains_logs_by_t_and_samples(tmp_path):
    trainer = run(make_cfg(tmp_path, "experiment=mnist_edm", "trainer.max_steps=3", "sampler.num_steps=3",
                           "callbacks.sample_grid.num_samples=4"))
    module = trainer.lightning_module
    assert isinstance(module.loss.prediction, EDMPrediction) and module.schedule.name == "edm"
    assert isinstance(module.loss.timestep_sampler, LogNormalTimesteps)
    assert module.sampler.sigma_schedule == "karras" and module.sampler.name == "heun"
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss_t" in metrics and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert (tmp_path / "samples").is_dir() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
