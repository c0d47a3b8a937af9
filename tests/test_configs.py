"""Every option of every diffusion config group instantiates, and builds what the Python API builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.diffusion import (
    Loss,
    LossWeighting,
    NoiseSchedule,
    Prediction,
    Sampler,
    get_prediction,
    get_sampler,
)

CONF = Path(__file__).resolve().parents[1] / "src" / "difflab" / "conf"


def options(group):
    files = sorted((CONF / group).glob("*.yaml"))
    assert files, f"no options in conf/{group}"
    return [pytest.param(f, id=f.stem) for f in files]


@pytest.mark.parametrize("path", options("schedule"))
def test_schedule_options(path):
    schedule = instantiate(OmegaConf.load(path))
    assert isinstance(schedule, NoiseSchedule) and schedule.name == path.stem
    # the yaml's constants are the named constructor's Python defaults (diffusers' defaults)
    torch.testing.assert_close(schedule.betas, getattr(NoiseSchedule, path.stem)().betas, atol=0, rtol=0)


@pytest.mark.parametrize("path", options("sampler"))
def test_sampler_options(path):
    """The yaml, get_sampler(name) (which reads it) and the class's own defaults build the same sampler."""
    schedule = NoiseSchedule.linear()
    cfg = OmegaConf.load(path)
    sampler = instantiate(cfg)
    assert isinstance(sampler, Sampler) and type(get_sampler(path.stem)) is type(sampler)
    reference = type(sampler)()  # the Python API's defaults
    assert torch.equal(sampler.grid(schedule).timesteps, reference.grid(schedule).timesteps)
    for key, value in OmegaConf.to_container(cfg).items():
        if not key.startswith("_"):
            assert getattr(sampler, key) == getattr(reference, key) == getattr(get_sampler(path.stem), key) == value


@pytest.mark.parametrize("path", options("prediction"))
def test_prediction_options(path):
    prediction = instantiate(OmegaConf.load(path))
    assert isinstance(prediction, Prediction) and prediction == get_prediction(path.stem)
    assert prediction.name == path.stem


@pytest.mark.parametrize("path", options("timestep_sampler"))
def test_timestep_sampler_options(path):
    sampler = instantiate(OmegaConf.load(path))
    t = sampler(512, NoiseSchedule.from_name("edm"), "cpu", torch.Generator().manual_seed(0))
    assert t.shape == (512,) and 0 <= float(t.min()) <= float(t.max()) <= 999 and t.unique().numel() > 100


@pytest.mark.parametrize("path", options("loss_weighting"))
def test_loss_weighting_options(path):
    weighting = instantiate(OmegaConf.load(path))
    assert isinstance(weighting, LossWeighting)
    assert weighting(torch.tensor([1.0]), get_prediction("epsilon")).shape == (1,)


@pytest.mark.parametrize("path", options("loss"))
def test_loss_options(path):
    """The yaml and the class's own defaults agree; every option reduces to one value per sample."""
    cfg = OmegaConf.load(path)
    loss = instantiate(cfg)
    assert isinstance(loss, Loss) and loss.name == path.stem
    reference = type(loss)()
    for key, value in OmegaConf.to_container(cfg).items():
        if not key.startswith("_"):
            assert getattr(loss, key) == getattr(reference, key) == value
    assert loss(torch.ones(3, 1, 4, 4), torch.zeros(3, 1, 4, 4)).shape == (3,)
