"""A callback that writes the global step training starts at (a resumed run: the restored step) to a file. Used by
test_slurm.py through ``+callbacks.start._target_=step_probe.StartStep`` (tests/ on PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class StartStep(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.write_text(str(trainer.global_step))
