"""Distillation of a reconstruction network: a (Kronecker) student trained to reproduce a trained dense teacher.

:class:`DistillReconModule` is :class:`~kronify.mri.training.module.ReconModule` (same optimiser, schedule, EMA,
validation, test metrics and checkpoints) with another training loss:

    L = w_teacher · loss(student(x), teacher(x)) + w_target · loss(student(x), y)
        + w_features · mean over layers of ‖s_l − t_l‖² / var(t_l)

``loss`` is the preset's composite loss, so "teacher" and "ground truth" are measured on the same scale; the
feature term is :class:`kronify.distill_loss.DistillLoss`'s (the outputs of layers of the same name in both
networks, e.g. every converted layer). The teacher is kept outside the module tree, as in
:class:`kronify.distill_lightning.DistillModule`: it is not trained, not in the optimiser, not in checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kronify.distill_loss import DistillLoss
from kronify.mri.training.module import ReconModule
from kronify.mri.training.wrappers import reconstruct

__all__ = ["DistillReconModule", "DistillWeights"]


@dataclass(frozen=True)
class DistillWeights:
    """Weights of the three terms of the distillation loss; ``features``: the layer names matched (empty: none)."""

    teacher: float = 1.0
    target: float = 0.0
    features: float = 0.0
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if min(self.teacher, self.target, self.features) < 0 or self.teacher + self.target == 0:
            raise ValueError(f"distillation weights must be >= 0 with teacher + target > 0, got {self}")
        if self.features > 0 and not self.layers:
            raise ValueError("a feature weight > 0 needs the layer names to match (layers=...)")

    def as_dict(self) -> dict[str, Any]:
        """As recorded in metrics.json."""
        return {"teacher": self.teacher, "target": self.target, "features": self.features,
                "feature_layers": len(self.layers)}


class DistillReconModule(ReconModule):
    """A :class:`ReconModule` whose training loss follows ``teacher`` (see the module's docstring).

    Args:
        model: the student (e.g. the Kronecker copy of the teacher, warm-started).
        teacher: the trained network; frozen and in eval mode while training, moved to the student's device.
        weights: the loss terms' weights (:class:`DistillWeights`).
        **kwargs: :class:`ReconModule`'s (loss, lr, schedule, EMA, protocol, ...).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, weights: DistillWeights = DistillWeights(),
                 **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        object.__setattr__(self, "teacher", teacher)  # a plain attribute: not a submodule, not in checkpoints
        self.weights = weights
        self.features = DistillLoss(lambda s, t: s.new_zeros(()), features=list(weights.layers)) \
            if weights.features > 0 else None
        if self.features is not None:
            self.features.check(model, teacher)

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def training_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total, each term) on a batch: the teacher runs first under no_grad, then the student."""
        w = self.weights
        hooks = self.features.hooks(self.model, self.teacher) if self.features is not None else contextlib.nullcontext()
        with hooks:
            with torch.no_grad():
                reference = reconstruct(self.teacher, batch).float()
            output = reconstruct(self.model, batch).float()
            terms: dict[str, Tensor] = {}
            total = output.new_zeros(())
            if w.teacher > 0:
                terms["teacher"] = self.loss_fn(output, reference)[0]
                total = total + w.teacher * terms["teacher"]
            if w.target > 0:
                terms["target"] = self.loss_fn(output, batch.target.float())[0]
                total = total + w.target * terms["target"]
            if self.features is not None:
                terms["features"] = self.features(output, output.detach())  # output term 0: features only
                total = total + w.features * terms["features"]
        return total, terms


def converted_layers(model: nn.Module) -> Sequence[str]:
    """Names of ``model``'s converted (Kronecker) layers, e.g. the feature layers of a distillation."""
    from kronify import is_kron

    return tuple(name for name, module in model.named_modules() if is_kron(module))
