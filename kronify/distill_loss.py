"""DistillLoss: what `kronify.distill` and `kronify.distill_lightning.DistillModule` minimise.

Output matching (MSE, L1, KL with temperature for logits, or a callable) plus optional hidden-feature
matching of named modules, normalised by the teacher's variance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronify.batches import output_tensor

__all__ = ["DistillLoss"]

_EPS = 1e-6  # keeps the feature loss finite on a constant teacher feature
Criterion = Callable[[Tensor, Tensor], Tensor]


def _kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) of the softmax over the last dim at temperature T, times T² (Hinton et al.), averaged
    over every other position (batch, and sequence for language models)."""
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def _criterion(loss: str | Criterion, temperature: float) -> Criterion:
    """The output loss for `loss`. "auto" is "mse": it is defined for any output, whereas KL is only right for
    class logits, which cannot be told reliably from regression outputs; pass loss="kl" for classifiers."""
    if callable(loss):
        return loss
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    losses = {"auto": F.mse_loss, "mse": F.mse_loss, "l1": F.l1_loss, "kl": lambda s, t: _kl(s, t, temperature)}
    if loss not in losses:
        raise ValueError(f"loss must be one of {sorted(losses)} or a callable(student, teacher), got {loss!r}")
    return losses[loss]


class DistillLoss:
    """Output matching on `output(model_out)` plus, for `features` (names present in both models, or a mapping
    student name -> teacher name), the mean over features of MSE / teacher variance, weighted by feature_weight.

    Use: inside `with loss.hooks(student, teacher):` run the teacher (under no_grad) then the student on a
    batch, and call `loss(student_out, teacher_out)` with their raw outputs. Hooks keep each feature module's
    last output of the forward (`output_tensor` of it); tensors are compared in float32."""

    def __init__(self, loss: str | Criterion = "auto", *, temperature: float = 1.0,
                 features: Sequence[str] | Mapping[str, str] | None = None, feature_weight: float = 1.0,
                 output: Callable[[Any], Tensor] | None = None) -> None:
        self.criterion = _criterion(loss, temperature)
        if isinstance(features, str):
            features = [features]
        self.pairs = dict(features) if isinstance(features, Mapping) else {n: n for n in features or ()}
        self.feature_weight = feature_weight
        self.output = output or output_tensor
        self._seen: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}

    def _sides(self, student: nn.Module, teacher: nn.Module) -> Iterator[tuple[str, dict[str, nn.Module], list[str]]]:
        yield "student", dict(student.named_modules()), list(self.pairs)
        yield "teacher", dict(teacher.named_modules()), list(self.pairs.values())

    def check(self, student: nn.Module, teacher: nn.Module) -> None:
        """ValueError naming every feature module missing from the model it should be in."""
        for who, modules, names in self._sides(student, teacher):
            if missing := [n for n in names if n not in modules]:
                raise ValueError(f"feature module(s) {missing} not found in the {who} "
                                 f"(its modules include {list(modules)[1:8]})")

    @contextlib.contextmanager
    def hooks(self, student: nn.Module, teacher: nn.Module) -> Iterator[None]:
        """Forward hooks capturing the feature modules' outputs; all removed on exit, error or not."""
        handles = []
        try:
            for who, modules, names in self._sides(student, teacher):
                handles += [modules[n].register_forward_hook(self._capture(who, n)) for n in names]
            yield
        finally:
            for h in handles:
                h.remove()
            for seen in self._seen.values():
                seen.clear()

    def _capture(self, who: str, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self._seen[who][name] = output_tensor(out)
        return hook

    def __call__(self, student_out: Any, teacher_out: Any) -> Tensor:
        """The total loss for one forward of each model (the captured features are used up, so each forward
        must be followed by a call)."""
        s, t = self.output(student_out), self.output(teacher_out)
        if s.shape != t.shape:
            raise ValueError(f"the student's output has shape {tuple(s.shape)} but the teacher's has shape "
                             f"{tuple(t.shape)}; they must match (pass output= to pick comparable tensors)")
        total = self.criterion(s.float(), t.to(s.device, torch.float32))
        if self.pairs:
            total = total + self.feature_weight * self._feature_loss()
        return total

    def _feature_loss(self) -> Tensor:
        """Mean over features of MSE(student, teacher) / var(teacher): scale-free, so all features weigh alike."""
        terms = []
        seen_s, seen_t = self._seen["student"], self._seen["teacher"]
        for s_name, t_name in self.pairs.items():
            if s_name not in seen_s or t_name not in seen_t:
                raise RuntimeError(f"feature {s_name!r} -> {t_name!r} did not run in the forward of "
                                   f"{'the student' if s_name not in seen_s else 'the teacher'}")
            s, t = seen_s[s_name].float(), seen_t[t_name].to(seen_s[s_name].device, torch.float32)
            if s.shape != t.shape:
                raise ValueError(f"feature {s_name!r} has shape {tuple(s.shape)} in the student but "
                                 f"{tuple(t.shape)} in the teacher ({t_name!r})")
            terms.append(F.mse_loss(s, t) / (t.var(correction=0) + _EPS))
        seen_s.clear()
        seen_t.clear()
        return torch.stack(terms).mean()
