"""Lightning glue: the diffusion LightningModule and training callbacks."""

from difflab.lightning.callbacks import SampleGrid
from difflab.lightning.classifier_module import NoisyClassifierModule
from difflab.lightning.diffusion_module import DiffusionModule

__all__ = ["DiffusionModule", "NoisyClassifierModule", "SampleGrid"]
