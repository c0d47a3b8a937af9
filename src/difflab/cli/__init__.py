"""Command-line entry points (Hydra mains): train, sample, evaluate, sweep_summary."""

from difflab.conf import CONFIG_DIR, CONFIG_PACKAGE

__all__ = ["CONFIG_DIR", "CONFIG_PACKAGE"]
