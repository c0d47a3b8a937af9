"""The sampler interface: shapes, dtypes, callbacks, clipping, seeds, errors, equivalences."""

from __future__ import annotations

import pytest
import torch

from analytic import MixtureDenoiser
from difflab.diffusion import Denoiser, NoiseSchedule, available_samplers, get_sampler

FAST = {"ddpm": 20, "ddim": 10, "dpmpp_2m": 10, "dpmpp_2m_sde": 10, "euler": 10, "heun": 5}


@pytest.fixture
def schedule():
    return NoiseSchedule.linear()


@pytest.mark.parametrize("name", available_samplers())
@pytest.mark.parametrize("shape", [(8,), (2, 3, 5, 5), (2, 7, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_shape_and_dtype(schedule, name, shape, dtype):
    sampler = get_sampler(name, num_steps=FAST.get(name, 10))
    seen_dtypes = set()

    def model_fn(x, t):
        seen_dtypes.add(x.dtype)
        assert t.dtype == torch.long and t.shape == (shape[0],)
        return MixtureDenoiser(schedule)(x, t)

    out = sampler.sample(Denoiser(model_fn, schedule), torch.randn(shape, dtype=dtype),
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == shape and out.dtype == dtype and torch.isfinite(out).all()
    assert seen_dtypes == {dtype}  # the network sees the caller's dtype, the state stays float64


@pytest.mark.parametrize("name", available_samplers())
def test_callback_and_call_count(schedule, name):
    steps = FAST.get(name, 10)
    sampler = get_sampler(name, num_steps=steps)
    denoiser = MixtureDenoiser(schedule)
    events = []
    out = sampler.sample(denoiser.as_denoiser(), torch.randn(4, 6), callback=events.append)
    assert [e["i"] for e in events] == list(range(steps))
    assert [e["t"] for e in events] == sampler.grid(schedule).timesteps.tolist()
    assert set(events[0]) == {"i", "t", "x", "denoised"}
    torch.testing.assert_close(events[-1]["x"].float(), out)
    assert denoiser.calls == (2 * steps - 1 if name == "heun" else steps)


def test_euler_equals_ddim(schedule):
    """Euler in x / alpha over sigma is DDIM (eta = 0) on the same grid (Karras et al. 2022, Sec. 3)."""
    denoiser = MixtureDenoiser(schedule, "v_prediction")
    x_T = torch.randn(4, 50, dtype=torch.float64)
    for spacing in ("leading", "trailing", "linspace"):
        ddim = get_sampler("ddim", num_steps=17, timestep_spacing=spacing)
        euler = get_sampler("euler", num_steps=17, timestep_spacing=spacing)
        torch.testing.assert_close(euler.sample(denoiser.as_denoiser(), x_T),
                                   ddim.sample(denoiser.as_denoiser(), x_T), atol=1e-12, rtol=0)


def test_ddim_eta_one_is_ddpm_in_distribution(schedule):
    """DDIM with eta = 1 uses the DDPM posterior variance: one step from the same state has equal moments."""
    denoiser = MixtureDenoiser(schedule)
    x_T = torch.zeros(20000, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    first = {}
    for key, sampler in {"ddim": get_sampler("ddim", num_steps=2, eta=1.0), "ddpm": get_sampler("ddpm", num_steps=2),
                         "ddim_eta0": get_sampler("ddim", num_steps=2, eta=0.0)}.items():
        sampler.sample(denoiser.as_denoiser(), x_T, generator=g,
                       callback=lambda e, k=key: first.setdefault(k, e["x"]) if e["i"] == 0 else None)
    std = first["ddpm"].std()
    # relative to the step's own spread: an absolute tolerance larger than that spread let eta = 0 pass too
    assert first["ddim_eta0"].std() < 0.1 * std  # no noise: the tolerance below tells the two apart
    torch.testing.assert_close(first["ddim"].std(), std, rtol=0.03, atol=0)  # the std of 20000 draws: ~0.5 %
    torch.testing.assert_close(first["ddim"].mean(), first["ddpm"].mean(), atol=5 * float(std) / 20000 ** 0.5,
                               rtol=0)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_generator_makes_stochastic_sampling_reproducible(schedule, name):
    sampler = get_sampler(name, num_steps=10, **({"eta": 1.0} if name == "ddim" else {}))
    denoiser = MixtureDenoiser(schedule)
    x_T = torch.randn(3, 10)
    run = lambda seed: sampler.sample(denoiser.as_denoiser(), x_T, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


@pytest.mark.parametrize("name", available_samplers())
def test_clip_sample_clamps_x0_estimate(schedule, name):
    sampler = get_sampler(name, num_steps=FAST.get(name, 10), clip_sample=True, clip_sample_range=0.5)
    denoised = []
    out = sampler.sample(MixtureDenoiser(schedule).as_denoiser(), torch.randn(4, 100),
                         callback=lambda e: denoised.append(e["denoised"]))
    assert all(d.abs().max() <= 0.5 for d in denoised)
    assert out.abs().max() <= 0.5 + 1e-6  # the last step lands on the clamped estimate


def test_ddpm_large_variance_adds_more_noise(schedule):
    denoiser = MixtureDenoiser(schedule)
    x_T = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    small = get_sampler("ddpm", num_steps=10, variance="small")
    large = get_sampler("ddpm", num_steps=10, variance="large")
    stds = {}
    for s in (small, large):
        s.sample(denoiser.as_denoiser(), x_T, generator=torch.Generator().manual_seed(1),
                 callback=lambda e, s=s: stds.setdefault(s.variance, e["x"].std()) if e["i"] == 8 else None)
    assert stds["large"] > stds["small"]


def test_errors_name_the_problem(schedule):
    with pytest.raises(ValueError, match="valid: ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, euler"):
        get_sampler("dpm")
    with pytest.raises(ValueError, match="valid: leading, trailing, linspace"):
        get_sampler("ddim", timestep_spacing="uniform").grid(schedule)
    with pytest.raises(ValueError, match="num_steps must be in"):
        get_sampler("ddim", num_steps=1001).grid(schedule)
    with pytest.raises(ValueError, match="valid: small"):
        get_sampler("ddpm", variance="learned")
    with pytest.raises(ValueError, match="valid: edm, epsilon, flow, sample, v_prediction"):
        Denoiser(lambda x, t: x, schedule, "eps")


def test_zero_terminal_snr_needs_v_prediction():
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    sampler = get_sampler("ddim", num_steps=10, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="v_prediction"):
        sampler.sample(Denoiser(lambda x, t: x, schedule, "epsilon"), torch.randn(2, 3))
    out = sampler.sample(MixtureDenoiser(schedule, "v_prediction").as_denoiser(), torch.randn(2, 30))
    assert torch.isfinite(out).all()
    euler = get_sampler("euler", num_steps=10, timestep_spacing="trailing")
    assert torch.isfinite(euler.sample(MixtureDenoiser(schedule, "v_prediction").as_denoiser(),
                                       torch.randn(2, 30))).all()


def test_progress_bar_on_request(schedule, capsys):
    sampler = get_sampler("ddim", num_steps=5)
    sampler.sample(MixtureDenoiser(schedule).as_denoiser(), torch.randn(2, 3), progress=True)
    assert "ddim" in capsys.readouterr().err
    sampler.sample(MixtureDenoiser(schedule).as_denoiser(), torch.randn(2, 3))
    assert capsys.readouterr().err == ""
