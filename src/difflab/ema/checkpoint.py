"""A train.py checkpoint whose EMA network is a post-hoc reconstruction: what sample.py, evaluate.py (``compare=``
over lengths) and export take, like any checkpoint of the run."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.ema.snapshots import Reconstruction, reconstruct
from difflab.files import atomic_write
from difflab.loading import ema_shapes, read_checkpoint, replace_ema_weights

POSTHOC_KEY = "difflab_posthoc_ema"  # what the checkpoint's EMA is: sigma_rel, step, fit error


def write_reconstructed(run_dir: str | Path, sigma_rel: float, step: int | None = None,
                        base: str | Path | None = None, out: str | Path | None = None,
                        trust=()) -> tuple[Path, Reconstruction]:
    """``run_dir/checkpoints/posthoc_sigma<s>_step<t>.ckpt`` (or ``out``): ``base`` (default the run's last.ckpt)
    with its EMA weights replaced by the reconstruction from ``run_dir/posthoc_ema`` (base=: give the run's own)."""
    run_dir = Path(run_dir).expanduser()
    base = Path(base) if base else run_dir / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(base, trust)
    found = reconstruct(run_dir / "posthoc_ema", sigma_rel, step, ema_shapes(checkpoint))
    replace_ema_weights(checkpoint, found.weights, "the post-hoc EMA snapshots", base)
    checkpoint[POSTHOC_KEY] = {"sigma_rel": found.sigma_rel, "step": found.step, "fit_error": found.fit_error,
                               "snapshots": found.snapshots}
    out = Path(out) if out else run_dir / "checkpoints" / f"posthoc_sigma{found.sigma_rel:.3f}_step{found.step}.ckpt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        torch.save(checkpoint, tmp)
    return out, found
