"""kronify.distill_lightning: the distillation of `kronify.distill` as a LightningModule, for the user's own
`pl.Trainer` (several GPUs or nodes with strategy="ddp", precision="bf16-mixed", gradient_clip_val=...).

Kept apart from kronify.distill so that `import kronify` never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from kronify.batches import call_model
from kronify.distill import DistillLoss, _first_device, _flags, _restore, check_settings, make_optimizer, train_mode

__all__ = ["DistillModule"]


class DistillModule(pl.LightningModule):
    """Trains `student` to reproduce `teacher`: the same objective (DistillLoss), AdamW and warm-up / cosine
    schedule (stepped every optimizer step) as `kronify.distill`; set the Trainer's max_steps to `steps`.

    The teacher is kept outside the module tree: it is not trained, not in the optimizer, not in the
    state_dict (checkpoints hold the student only, under "student."), and its parameters and requires_grad
    flags are never changed. On fit start (after the strategy has placed this module) it is moved to this
    module's device (under DDP: each process's GPU) and put in eval mode, and the student goes into train mode
    with its BatchNorm-style running statistics frozen if freeze_norm_stats (Lightning then warns that modules
    are in eval mode: that is these). On fit end both models' train/eval flags are restored and the teacher
    goes back to the device it was on (not after an error: Lightning calls no module hook then). Each training
    step runs the teacher under no_grad, then the student. Clipping and mixed precision are the Trainer's
    (gradient_clip_val=, precision="bf16-mixed").
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, steps: int, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup: float | int = 0.05, loss: str | Callable = "auto",
                 temperature: float = 1.0, features: Sequence[str] | Mapping[str, str] | None = None,
                 feature_weight: float = 1.0, output: Callable[[Any], Tensor] | None = None,
                 freeze_norm_stats: bool = False) -> None:
        super().__init__()
        check_settings(steps, lr, warmup)
        self.objective = DistillLoss(loss, temperature=temperature, features=features,
                                     feature_weight=feature_weight, output=output)
        self.objective.check(student, teacher)
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # a plain attribute: not a submodule
        self.steps, self.lr, self.weight_decay, self.warmup = steps, lr, weight_decay, warmup
        self.freeze_norm_stats = freeze_norm_stats
        self._saved: tuple[torch.device | None, list[tuple[nn.Module, bool]]] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    def train(self, mode: bool = True) -> DistillModule:
        """Lightning switches modes around validation; in train mode the norm statistics stay frozen."""
        super().train(mode)
        if mode:
            train_mode(self.student, self.freeze_norm_stats)
        return self

    def on_fit_start(self) -> None:
        """Teacher to this device in eval mode, student in train mode (norm statistics frozen if asked)."""
        self._saved = (_first_device(self.teacher), _flags(self.teacher) + _flags(self.student))
        self.teacher.to(self.device).eval()
        self.train()

    def on_fit_end(self) -> None:
        """Both models' train/eval flags as they were before fit; the teacher back on its device."""
        if self._saved is not None:
            device, flags = self._saved
            _restore(flags)
            if device is not None:
                self.teacher.to(device)
            self._saved = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        with self.objective.hooks(self.student, self.teacher):
            with torch.no_grad():
                teacher_out = call_model(self.teacher, batch)
            loss = self.objective(call_model(self.student, batch), teacher_out)
        self.log("distill/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = make_optimizer(self.student, steps=self.steps, lr=self.lr,
                                              weight_decay=self.weight_decay, warmup=self.warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
