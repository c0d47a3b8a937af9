"""difflab: train, sample and evaluate diffusion models with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
