"""Diffusion math: noise schedules, parameterisations, training objectives and samplers."""

from difflab.diffusion.objectives import (
    DiffusionLoss,
    LossOutput,
    LossWeighting,
    MinSNRWeighting,
    UniformTimesteps,
    UniformWeighting,
)
from difflab.diffusion.parameterization import (
    PREDICTIONS,
    EpsilonPrediction,
    Prediction,
    SamplePrediction,
    VPrediction,
    get_prediction,
)
from difflab.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlus2MSampler,
    EulerSampler,
    HeunSampler,
    Sampler,
    get_sampler,
)
from difflab.diffusion.schedules import SCHEDULES, NoiseSchedule
from difflab.diffusion.timesteps import SPACINGS, spaced_timesteps

__all__ = [
    "PREDICTIONS", "SAMPLERS", "SCHEDULES", "SPACINGS",
    "DDIMSampler", "DDPMSampler", "DPMSolverPlusPlus2MSampler", "DiffusionLoss", "EpsilonPrediction",
    "EulerSampler", "HeunSampler", "LossOutput", "LossWeighting", "MinSNRWeighting", "NoiseSchedule",
    "Prediction", "SamplePrediction", "Sampler", "UniformTimesteps", "UniformWeighting", "VPrediction",
    "get_prediction", "get_sampler", "spaced_timesteps",
]
