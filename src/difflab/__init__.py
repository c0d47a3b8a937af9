"""difflab: train, sample and evaluate diffusion models with PyTorch Lightning and Hydra.

    pipe = difflab.load("outputs/.../checkpoints/last.ckpt")
    images = pipe(n=16, label=7, guidance_scale=3, seed=0)
    run = difflab.train("data=digits", "network=tiny", "trainer.max_steps=300", run_dir="runs/a")   # as train.py
"""

__version__ = "0.1.0"

__all__ = ["DiffusionModel", "Pipeline", "TrainedRun", "compose", "load", "load_model", "load_module", "train"]


def __getattr__(name: str):
    # lazy (PEP 562): `import difflab.cli.train` should not pay for the sampling stack it does not use
    if name in ("load", "load_model", "load_module"):
        from difflab import loading

        return getattr(loading, name)
    if name in ("train", "compose", "TrainedRun"):
        from difflab import training

        return getattr(training, name)
    if name == "DiffusionModel":
        from difflab.model import DiffusionModel

        return DiffusionModel
    if name == "Pipeline":
        from difflab.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
