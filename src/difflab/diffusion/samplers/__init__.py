"""Samplers: a solver step and the grid it runs on, one signature for all (after k-diffusion's ``sampling.py``).

    sampler = get_sampler("ddim", num_steps=50)         # conf/sampler/ddim.yaml with overrides
    x0 = sampler.sample(Denoiser(model, schedule, "v_prediction"), x_T, generator=g)

The options are the files of the ``sampler`` config group: a new solver is a module, a yaml and a test.
"""

from __future__ import annotations

from difflab.diffusion.samplers.base import Callback, Denoise, Sampler
from difflab.diffusion.samplers.ddim import DDIMSampler, require_invertible
from difflab.diffusion.samplers.ddpm import DDPMSampler
from difflab.diffusion.samplers.dpm_solver import DPMSolverPlusPlus2MSampler, DPMSolverPlusPlus2MSDESampler
from difflab.diffusion.samplers.euler_ancestral import EulerAncestralSampler
from difflab.diffusion.samplers.karras import ChurnSampler, EulerSampler, HeunSampler, KarrasSampler
from difflab.diffusion.samplers.unipc import UniPCSampler


def available_samplers() -> list[str]:
    """The sampler names: the options of the ``sampler`` config group."""
    from difflab.conf import options

    return options("sampler")


def get_sampler(name: str, **overrides) -> Sampler:
    """The sampler of ``conf/sampler/<name>.yaml`` (the same node as ``sampler=<name>``), with ``overrides``."""
    from difflab.conf import build

    return build("sampler", name, **overrides)


__all__ = ["Callback", "ChurnSampler", "DDIMSampler", "DDPMSampler", "DPMSolverPlusPlus2MSDESampler",
           "DPMSolverPlusPlus2MSampler", "Denoise", "EulerAncestralSampler", "EulerSampler", "HeunSampler",
           "KarrasSampler", "Sampler", "UniPCSampler", "available_samplers", "get_sampler", "require_invertible"]
