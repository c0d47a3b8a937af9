"""The probes of difflab.probe during training: their summary numbers go to the loggers as ``probe/<name>``, their
figures to ``<run dir>/probes/<probe>/step_XXXXXX.png`` and to the loggers that take images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import default_collate

from difflab import probe
from difflab.conditioning.base import NoConditioning
from difflab.data.draw import first, size
from difflab.errors import UsageError
from difflab.lightning.callbacks import Periodic, log_image
from difflab.nn.dit import DiTBlock
from difflab.nn.unet import ResBlock
from difflab.plots import figure_pixels, save_figure
from difflab.probe.bayes_gap import mixture_of
from difflab.probe.cross_attention import text_part


class ProbeCallback(Periodic):
    """Every ``every_n_steps`` optimizer steps (and at the end of training) run ``probes`` (of ``difflab.probe.PROBES``)
    on the EMA weights with ``num_images`` fixed validation images; those that do not apply to the model (cfg_gap
    to an unconditional one, cross_attention without text, bayes_gap off ``data=gmm``) are skipped, said once."""

    def __init__(self, probes: Sequence[str] = probe.PROBES, every_n_steps: int = 500, num_images: int = 16,
                 seed: int = 0, dirname: str = "probes"):
        super().__init__(every_n_steps)
        unknown = [name for name in probes if name not in probe.PROBES]
        if unknown:
            raise UsageError(f"unknown probe(s) {unknown}: valid: {', '.join(probe.PROBES)}")
        self.probes, self.num_images, self.seed, self.dirname = list(probes), num_images, seed, dirname
        self._active: list[str] | None = None
        self._batch: dict | None = None

    def applicable(self, pl_module: L.LightningModule) -> list[str]:
        pipe = pl_module.pipeline()
        reasons = {"t_response": None if any(isinstance(m, ResBlock | DiTBlock) for m in pipe.network.modules())
                   else "no ResBlocks",
                   "cfg_gap": "unconditional" if isinstance(pipe.conditioner, NoConditioning) else None}
        for name, check, why in (("cross_attention", text_part, "not text-conditioned"),
                                 ("bayes_gap", lambda _: mixture_of(pl_module.run_config or {"data": {}}),
                                  "not data=gmm")):
            try:
                check(pipe)
            except UsageError:
                reasons[name] = why
        skipped = {name: reasons.get(name) for name in self.probes if reasons.get(name)}
        if skipped:
            rank_zero_info("probes skipped: " + ", ".join(f"{name} ({why})" for name, why in skipped.items()))
        return [name for name in self.probes if name not in skipped]

    @rank_zero_only
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, object]:
        if self._active is None:
            self._active = self.applicable(pl_module)
        if not self._active:
            return {}
        pipe = pl_module.pipeline()
        results = {name: self._probe(name, pipe, trainer, pl_module) for name in self._active}
        step = trainer.global_step
        scalars = {f"probe/{key}": value for result in results.values() if hasattr(result, "scalars")
                   for key, value in result.scalars().items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        for name, result in results.items():
            figure = result.figure(title=f"{name} at step {step}")
            save_figure(figure, Path(trainer.default_root_dir) / self.dirname / name / f"step_{step:06d}.png")
            log_image(trainer, f"probe/{name}", figure_pixels(figure))
        return results

    def _probe(self, name: str, pipe, trainer: L.Trainer, pl_module: L.LightningModule):
        if name == "bayes_gap":
            return probe.bayes_gap(pipe, mixture_of(pl_module.run_config), n=self.num_images * 16,
                                   seed=self.seed)
        if name == "cross_attention":
            prompts = text_part(pipe).example_prompts[:4]
            return probe.cross_attention(pipe, prompts, seed=self.seed)
        batch = self._validation_batch(trainer, pipe.device)
        if name == "cfg_gap":
            return probe.guidance_gap(pipe, batch, seed=self.seed)
        return probe.t_response(pipe, batch, seed=self.seed)

    def _validation_batch(self, trainer: L.Trainer, device: torch.device) -> dict:
        """The first ``num_images`` validation images (training images if there is no validation split), fixed for
        the run so that the figures compare across steps."""
        if self._batch is None:
            datamodule = trainer.datamodule
            dataset = getattr(datamodule, "val_set", None)
            if dataset is None or size(dataset) == 0:
                dataset = datamodule.train_set
            self._batch = default_collate(first(dataset, self.num_images))
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self._batch.items()}
