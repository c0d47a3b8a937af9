"""Diffusion math: noise schedules, parameterisations, the denoiser, training objectives, grids and samplers."""

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.grid import Grid
from difflab.diffusion.losses import HuberLoss, L1Loss, L2Loss, Loss, PseudoHuberLoss
from difflab.diffusion.objectives import (
    DiffusionLoss,
    LogitNormalTimesteps,
    LogNormalTimesteps,
    LossOutput,
    LossWeighting,
    MinSNRWeighting,
    UniformTimesteps,
    UniformWeighting,
)
from difflab.diffusion.parameterization import (
    EDMPrediction,
    EpsilonPrediction,
    FlowPrediction,
    Prediction,
    SamplePrediction,
    VPrediction,
    get_prediction,
)
from difflab.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlus2MSampler,
    DPMSolverPlusPlus2MSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    Sampler,
    UniPCSampler,
    available_samplers,
    get_sampler,
)
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import SPACINGS, spaced_timesteps

__all__ = [
    "SPACINGS", "DDIMSampler", "DDPMSampler", "DPMSolverPlusPlus2MSDESampler", "DPMSolverPlusPlus2MSampler",
    "Denoiser", "DiffusionLoss", "EDMPrediction", "EpsilonPrediction", "EulerAncestralSampler", "EulerSampler",
    "FlowPrediction", "Grid", "HeunSampler", "HuberLoss", "L1Loss", "L2Loss", "Loss", "LogNormalTimesteps",
    "LogitNormalTimesteps", "LossOutput", "LossWeighting", "MinSNRWeighting", "NoiseSchedule", "Prediction",
    "PseudoHuberLoss", "SamplePrediction", "Sampler", "UniPCSampler", "UniformTimesteps", "UniformWeighting",
    "VPrediction", "available_samplers", "get_prediction", "get_sampler", "spaced_timesteps",
]
