"""Lightning glue: the diffusion LightningModule and training callbacks."""

from difflab.lightning.autoencoder_module import AutoencoderModule
from difflab.lightning.callbacks import SampleGrid
from difflab.lightning.classifier_module import NoisyClassifierModule
from difflab.lightning.diffusion_module import DiffusionModule
from difflab.lightning.latent_diffusion_module import LatentDiffusionModule

__all__ = ["AutoencoderModule", "DiffusionModule", "LatentDiffusionModule", "NoisyClassifierModule", "SampleGrid"]
