"""Skip the optimizer steps whose loss or gradients are NaN / inf, and stop a run that keeps producing them before it
burns its allocation or overwrites good checkpoints."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from difflab.errors import RunStopped
from difflab.lightning.checkpoint_io import SafeCheckpointIO
from difflab.lightning.compat import logs_this_step


class TrainingDiverged(RunStopped):
    """The loss, the gradients or the EMA weights stayed non-finite: training cannot recover on its own."""


def uses_grad_scaler(trainer: L.Trainer) -> bool:
    """Whether the optimizer steps go through an enabled GradScaler (``precision=16-mixed``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


class NonFiniteGuard(L.Callback):
    """A step whose loss or gradient norm is non-finite is skipped: its gradients are dropped before the optimizer
    (and the module's EMA update, which needs gradients) sees them. Under fp16's GradScaler, non-finite gradients
    with a finite loss are the scaler's routine overflow (it skips that step itself): not counted, nothing held.
    Skips are counted in ``train/skipped_steps``.
    ``max_consecutive`` skips in a row, or non-finite EMA weights (checked at logging steps), stop the run with
    ``TrainingDiverged`` naming the step and the last good checkpoint. While skipping, checkpoint writes are held
    (``SafeCheckpointIO.hold``): the weights would reproduce the NaN, and must not replace ``last.ckpt``.

    One host sync per step (the finiteness test), as a GradScaler does; for the operation that makes the first NaN,
    run with ``trainer.detect_anomaly=true`` (slow: debugging only).
    """

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = max_consecutive  # skips in a row before the run stops
        self.skipped = 0  # over the whole run, resumed runs included
        self.consecutive = 0
        self.first_bad_step: int | None = None  # global step at which the current run of skips began
        self._loss_finite: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # no sync here: read once, before the optimizer step
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if uses_grad_scaler(trainer):  # fp16: an overflow in the gradients is the scaler's to skip (it lowers the
            finite = torch.tensor(True)  # scale and skips the step); only a non-finite loss is a non-finite step
        else:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            finite = torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else torch.tensor(True)
        if self._loss_finite is not None:
            finite = finite & self._loss_finite.to(finite.device)
        self._loss_finite = None
        if trainer.world_size > 1:  # every rank skips the same steps, or DDP replicas drift apart
            finite = torch.tensor(not trainer.strategy.reduce_boolean_decision(~finite.cpu(), all=False))
        if bool(finite):
            self._recovered(trainer)
            return
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        step = trainer.global_step
        if self.first_bad_step is None:
            self.first_bad_step = step
            rank_zero_warn(f"non-finite loss or gradients at step {step}: skipping the update; checkpoints are held "
                           f"until the loss is finite again ({self.max_consecutive} skips in a row stop the run)")
        io = self._checkpoint_io(trainer)
        if io is not None:
            io.hold = f"the loss has been non-finite since step {self.first_bad_step}"
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: the loss or gradients were non-finite for {self.consecutive} steps in a row "
                f"(steps {self.first_bad_step}-{step}); {self._last_good(trainer)}. Lower optim.lr or "
                "trainer.gradient_clip_val; trainer.detect_anomaly=true finds the operation that made the first NaN")

    def _recovered(self, trainer: L.Trainer) -> None:
        if self.consecutive:
            rank_zero_warn(f"the loss is finite again at step {trainer.global_step} after {self.consecutive} "
                           "skipped steps")
        self.consecutive, self.first_bad_step = 0, None
        io = self._checkpoint_io(trainer)
        if io is not None:
            io.hold = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        ema = getattr(pl_module, "ema", None)
        if isinstance(ema, torch.nn.Module) and logs_this_step(trainer):
            params = [p for p in ema.parameters() if p.is_floating_point()]
            if params and not bool(torch.stack(torch._foreach_norm(params)).isfinite().all()):
                raise TrainingDiverged(f"the EMA weights are non-finite at step {trainer.global_step}; "
                                       f"{self._last_good(trainer, trainer.global_step)}")

    def _last_good(self, trainer: L.Trainer, before: int | None = None) -> str:
        io = self._checkpoint_io(trainer)
        before = self.first_bad_step if before is None else before
        if io is None:
            return "the checkpoints folder holds the last good checkpoints"
        return io.last_written_message(before, trainer.ckpt_path)

    @staticmethod
    def _checkpoint_io(trainer: L.Trainer) -> SafeCheckpointIO | None:
        io = trainer.strategy.checkpoint_io
        return io if isinstance(io, SafeCheckpointIO) else None
