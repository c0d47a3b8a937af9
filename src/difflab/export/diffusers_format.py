"""A difflab run as a diffusers pipeline folder: the network, and a scheduler config that reproduces the run's
schedule, parameterisation and sampler (their equality is what tests/test_golden_diffusers.py checks).

Pixel models: ``DDIMPipeline`` when the sampler is DDIM, ``DDPMPipeline`` with the DDPM or DPM-Solver++ scheduler.
Other samplers fall back to DPM-Solver++(2M) on their grid: DDPMPipeline neither scales model inputs (Euler, Heun)
nor runs a scheduler whose step takes no generator (UniPC). diffusers' DDIM steps from t to t - T / N whatever the
spacing, which is the next grid point for ``leading`` spacing only: DDIM runs on other grids differ slightly.
diffusers' pixel pipelines are unconditional: class-conditional runs export as format=safetensors.

Latent text models (a diffusers VAE, a UNet2DConditionModel, prompts encoded as Stable Diffusion does: padded to
max_length without a mask, no pooled vector) export as a ``StableDiffusionPipeline`` with any of the schedulers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from difflab.conditioning.base import NoConditioning
from difflab.errors import UsageError
from difflab.extras import require

if TYPE_CHECKING:
    from difflab.model import DiffusionModel

# difflab's sampler class -> diffusers' scheduler class
SCHEDULERS = {
    "DDIMSampler": "DDIMScheduler",
    "DDPMSampler": "DDPMScheduler",
    "DPMSolverPlusPlus2MSampler": "DPMSolverMultistepScheduler",
    "DPMSolverPlusPlus2MSDESampler": "DPMSolverMultistepScheduler",
    "UniPCSampler": "UniPCMultistepScheduler",
    "EulerSampler": "EulerDiscreteScheduler",
    "EulerAncestralSampler": "EulerAncestralDiscreteScheduler",
    "HeunSampler": "HeunDiscreteScheduler",
}
# the schedulers diffusers' pixel pipelines run (DDPMPipeline: step(..., generator=) on unscaled inputs)
PIXEL_SCHEDULERS = {"DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler"}
KARRAS_GRIDS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}


def unsupported(model: DiffusionModel) -> str | None:
    """Why this run cannot be a diffusers pipeline folder; None when it can."""
    network = model.network
    if type(network).__name__ != "DiffusersUNet":
        return (f"the network is difflab's {type(network).__name__}, which diffusers does not know: train with "
                "network=diffusers_unet for a diffusers pipeline")
    if model.prediction.name not in ("epsilon", "v_prediction", "sample"):
        return f"prediction={model.prediction.name} has no diffusers DDPM-family scheduler"
    schedule = model.schedule.name
    if schedule in ("edm", "flow"):
        return f"schedule={schedule} has no diffusers DDPM-family scheduler"
    if model.first_stage is not None:
        return _unsupported_text_to_image(model, network)
    if not isinstance(model.conditioner, NoConditioning):
        return "diffusers' DDPM / DDIM pipelines are unconditional and this run is conditional"
    return None


def _unsupported_text_to_image(model: DiffusionModel, network: nn.Module) -> str | None:
    """Why a latent run is not a StableDiffusionPipeline; None when it is."""
    from difflab.conditioning.text import TextConditioner

    first_stage, conditioner = model.first_stage, model.conditioner
    if not hasattr(first_stage, "vae"):
        return "a latent diffusers pipeline needs a diffusers VAE (first_stage.pretrained), not difflab's autoencoder"
    if first_stage.shift_factor:
        return "StableDiffusionPipeline decodes latents / scaling_factor without a shift: this first stage shifts"
    if not isinstance(conditioner, TextConditioner) or network.kind != "unet2d_condition":
        return "latent runs export as StableDiffusionPipeline, a text-to-image UNet2DConditionModel (conditioning=text)"
    if conditioner.pooled or network.cond_dim is not None:
        return ("StableDiffusionPipeline passes no pooled text: train with conditioning.pooled=false "
                "network.cond_dim=null")
    if conditioner.encoder.padding != "max_length":
        return ("StableDiffusionPipeline encodes prompts padded to max_length without a mask: train with "
                "text_encoder.padding=max_length (experiment=sd15_finetune does)")
    return None


def schedule_config(model: DiffusionModel) -> dict:
    """The noise schedule as diffusers' common scheduler arguments: a named beta schedule where diffusers has the
    same one, else the betas themselves (``trained_betas``)."""
    schedule = model.schedule
    params = schedule.params
    config = {"num_train_timesteps": schedule.num_timesteps}
    named = {"linear": "linear", "scaled_linear": "scaled_linear"}.get(schedule.name)
    if schedule.name == "cosine" and math.isclose(params.get("s", 0.008), 0.008) and \
            math.isclose(params.get("max_beta", 0.999), 0.999):
        named = "squaredcos_cap_v2"
    if named is None:
        return {**config, "trained_betas": schedule.betas.tolist()}
    config.update(beta_schedule=named, rescale_betas_zero_snr=bool(schedule.zero_terminal_snr))
    if "beta_start" in params:
        config.update(beta_start=params["beta_start"], beta_end=params["beta_end"])
    return config


def scheduler_config(model: DiffusionModel, sampler=None) -> tuple[str, dict]:
    """(diffusers' scheduler class name, its config) equal to ``sampler`` (default: the run's) under the run's
    schedule and prediction."""
    sampler = sampler or model.sampler
    name = SCHEDULERS.get(type(sampler).__name__)
    if name is None:
        raise UsageError(f"sampler {type(sampler).__name__} has no diffusers scheduler: pick one of "
                         f"{', '.join(sorted(SCHEDULERS))} (sampler=ddim)")
    config = {**schedule_config(model), "prediction_type": model.prediction.name,
              "timestep_spacing": sampler.timestep_spacing, "steps_offset": sampler.steps_offset}
    if sampler.sigma_schedule is not None:
        if sampler.sigma_schedule not in KARRAS_GRIDS or name in ("DDIMScheduler", "DDPMScheduler"):
            raise UsageError(f"{type(sampler).__name__} with sigma_schedule={sampler.sigma_schedule} has no diffusers "
                             "scheduler: export with the sampler's plain grid (sampler.sigma_schedule=null)")
        config[KARRAS_GRIDS[sampler.sigma_schedule]] = True
    if name in ("DDIMScheduler", "DDPMScheduler"):
        config.update(clip_sample=sampler.clip_sample, clip_sample_range=sampler.clip_sample_range)
    if name == "DDIMScheduler":
        config["set_alpha_to_one"] = True  # the last step lands on alpha_bar = 1, as difflab's DDIM
    elif name == "DDPMScheduler":
        config["variance_type"] = {"small": "fixed_small", "large": "fixed_large"}[sampler.variance]
    elif name == "DPMSolverMultistepScheduler":
        sde = type(sampler).__name__.endswith("SDESampler")
        config.update(algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_order=2,
                      final_sigmas_type="zero", lower_order_final=True)
        if sde:
            config["solver_type"] = sampler.solver_type
    elif name == "UniPCMultistepScheduler":
        config.update(solver_order=sampler.solver_order, solver_type=sampler.solver_type, predict_x0=True,
                      disable_corrector=list(sampler.disable_corrector), final_sigmas_type="zero")
    return name, config


def scheduler(model: DiffusionModel, sampler=None):
    """The diffusers scheduler object of ``scheduler_config``."""
    name, config = scheduler_config(model, sampler)
    return getattr(require("diffusers", "diffusers", "format=diffusers"), name).from_config(config)


def save_pipeline(model: DiffusionModel, folder: Path) -> dict[str, str]:
    """Write the run as a diffusers pipeline folder; returns {model path: sub-folder} of the weights in it."""
    diffusers = require("diffusers", "diffusers", "format=diffusers")
    if model.first_stage is not None:
        return save_text_to_image(model, folder)
    sampler = model.sampler
    name = SCHEDULERS.get(type(sampler).__name__)
    if name not in PIXEL_SCHEDULERS or (sampler.sigma_schedule is not None and name != "DPMSolverMultistepScheduler"):
        sampler = _fallback(sampler)
    name, config = scheduler_config(model, sampler)
    pipeline_class = diffusers.DDIMPipeline if name == "DDIMScheduler" else diffusers.DDPMPipeline
    pipeline = pipeline_class(unet=model.network.model, scheduler=getattr(diffusers, name).from_config(config))
    pipeline.save_pretrained(folder)
    return {"network.model": "unet"}


def _fallback(sampler):
    """DPM-Solver++(2M) on the sampler's steps and grid: what diffusers' pixel pipelines run in its place."""
    from difflab.diffusion.samplers import get_sampler

    print(f"note: diffusers' pixel pipelines cannot run {type(sampler).__name__}: the folder's scheduler is "
          "DPM-Solver++(2M) on its grid (swap in another: pipe.scheduler = X.from_config(pipe.scheduler.config))")
    return get_sampler("dpmpp_2m", num_steps=sampler.num_steps, timestep_spacing=sampler.timestep_spacing,
                       steps_offset=sampler.steps_offset, sigma_schedule=sampler.sigma_schedule, rho=sampler.rho)


def save_text_to_image(model: DiffusionModel, folder: Path) -> dict[str, str]:
    """The run as a StableDiffusionPipeline folder (no safety checker): its UNet, VAE (with the run's latent scale),
    text encoder and tokenizer (padding to the run's max_length), and the run's sampler as its scheduler."""
    diffusers = require("diffusers", "diffusers", "format=diffusers")
    encoder, vae = model.conditioner.encoder, model.first_stage.vae
    vae.register_to_config(scaling_factor=model.first_stage.scale_factor)
    encoder.tokenizer.model_max_length = encoder.max_length
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=encoder.model, tokenizer=encoder.tokenizer, unet=model.network.model,
        scheduler=scheduler(model), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return {"network.model": "unet", "first_stage.vae": "vae"}
