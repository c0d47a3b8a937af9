"""Command-line entry points (Hydra mains): train, sample."""

from pathlib import Path

# conf/ lives at the repository root (an editable install); DIFFLAB_CONF points elsewhere if needed
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")
