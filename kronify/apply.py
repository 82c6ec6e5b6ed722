"""Carry out conversion plans: `apply_in_place` (what `kronify.convert` does, layer by layer, freeing each dense
weight as its factors are made) and `apply_plans` (every layer fitted first, from the model or from tensors read
elsewhere, then all installed, with a full undo: kronify.io and the calibrated fit use it). Both make a layer's
factors in one place (`_fit`) and install them in one (`_install`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kronify.layer_kinds import kind_of
from kronify.linked_weight import build_once_per_call, link_weight, unlink
from kronify.parametrization import KronParametrization, is_kron, share_parametrization
from kronify.plan import Plan, Target
from kronify.report import own_param_count

__all__ = ["PartialConversionError", "Undo", "apply_in_place", "apply_plans"]


class Undo:
    """Records each owner's state before its first registration and puts it back on `undo()`."""

    def __init__(self) -> None:
        self._saved: list[tuple] = []

    def record(self, owner: nn.Module, tensor: str) -> None:
        t = owner._parameters[tensor]
        self._saved.append((owner, owner.__class__, dict(owner._parameters), dict(owner._modules), t, t.data))

    def undo(self) -> None:
        for owner, cls, params, modules, t, data in reversed(self._saved):
            with torch.no_grad():
                t.set_(data)  # a single-factor right_inverse set_()s the Parameter itself
            owner.__class__, owner._parameters, owner._modules = cls, params, modules
            if not is_kron(owner):  # weights its forwards built (a calibration ran them) would outlive the undo
                unlink(owner)
        self._saved.clear()


def apply_plans(plans: list[Plan], warm_start: bool, read: Callable[[Target], Tensor] | None = None) -> Undo:
    """Fit every planned layer (from the model's own weights, or from the dense tensors `read(target)` gives, read
    one at a time: a checkpoint), then parametrize them all. Any failure leaves the model as it was and raises
    naming the layer; the returned `Undo` puts the model back later (kronify.io, the calibrated fit)."""
    fits = []
    for plan in plans:
        with _naming(plan):
            fits.append([_fit(t, plan.settings, (read or _dense)(t), warm_start) for t in plan.targets])
    undo = Undo()
    try:
        for plan, layer in zip(plans, fits):
            with _naming(plan):
                for fit in layer:
                    _install(fit, undo)
    except BaseException:
        undo.undo()
        raise
    for plan, layer in zip(plans, fits):
        _report(plan, layer, warm_start)
    _finish(plans)
    return undo


@contextmanager
def _naming(plan: Plan) -> Iterator[None]:
    """Re-raise an error in converting ``plan``'s layer as a RuntimeError that names the layer."""
    try:
        yield
    except Exception as e:
        raise RuntimeError(f"converting {plan.row.name!r} ({plan.row.kind}) failed: {e}") from e


def _finish(plans: list[Plan]) -> None:
    """What is done once nothing can fail any more: layers that read a weight often build it once per call."""
    for plan in plans:
        kind = kind_of(plan.targets[0].owner)  # None for a ParametrizationList owner
        if kind is not None and kind.reads_weight_often:
            build_once_per_call(plan.targets[0].owner)


# ---- layer by layer, freeing each dense weight -----------------------------------------------------------------
class PartialConversionError(RuntimeError):
    """An unexpected failure (out of memory, an interrupt, a fit that failed) while `convert` applied its plans
    layer by layer, after every check on the input had passed. `converted`: the layers that are now Kronecker
    layers; `remaining`: the layers still exactly as they were, the failed one first. Converting the model again
    with the same settings converts the remaining ones (converted layers are skipped)."""

    def __init__(self, message: str, converted: list[str], remaining: list[str]) -> None:
        super().__init__(message)
        self.converted, self.remaining = converted, remaining


@dataclass
class _Fit:
    """One target's parametrization and its factors, made before the model changes: fitted (warm start; sq_norm
    = ‖w‖²) or empty, to be cold-started to the dense weight's `std`."""

    target: Target
    p: KronParametrization
    factors: list[Tensor]
    sq_norm: float = 0.0
    std: float | None = None


def _std(w: Tensor) -> float:
    """Standard deviation of w in float64, streamed over rows (no float64 copy of w)."""
    if w.numel() <= 1:
        return float(w.detach().double().abs().sum())
    rows = w.detach().reshape(w.shape[0], -1)
    total = sq = 0.0
    for block in rows.split(max(1, (1 << 16) // rows.shape[1])):
        block = block.double()
        total, sq = total + float(block.sum()), sq + float(block.square().sum())
    return math.sqrt(max(sq - total * total / w.numel(), 0.0) / (w.numel() - 1))


def _fit(target: Target, settings: dict, w: Tensor, warm_start: bool) -> _Fit:
    """The parametrization of `target` and its factors from the dense tensor `w` (the nearest Kronecker sum, or
    empty factors and w's std for a cold start, or empty factors for a meta w): changes nothing."""
    p = KronParametrization(target.shape, settings["n"], settings["terms"], settings["algebra"], target.chunks)
    p.to(device=w.device, dtype=w.dtype)
    if not warm_start or w.is_meta:  # cold start, or a meta weight (no checkpoint): shapes only
        return _Fit(target, p, p.empty_factors(w), std=None if w.is_meta else _std(w))
    factors, sq_norm = p.fit(w)
    return _Fit(target, p, factors, sq_norm=sq_norm)


def _meta_placeholder(owner: nn.Module, name: str) -> None:
    """Swap `owner.<name>` for a meta tensor of its shape, so registering the parametrization fits nothing."""
    t = owner._parameters[name]
    owner._parameters[name] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), t.requires_grad)


def _install(fit: _Fit, undo: Undo) -> None:
    """Parametrize fit.target with fit.p and put fit.factors in as its originals (tied heads share them)."""
    owner, name = fit.target.owner, fit.target.tensor
    undo.record(owner, name)
    requires_grad = owner._parameters[name].requires_grad
    fit.p.param_order = list(owner._parameters)
    _meta_placeholder(owner, name)
    error = fit.p.fit_error
    parametrize.register_parametrization(owner, name, fit.p, unsafe=True)
    link_weight(owner, name)
    plist = owner.parametrizations[name]
    names = ["original0", "original1"] if fit.p.learned else ["original"]
    for key, factor in zip(names, fit.factors):
        setattr(plist, key, nn.Parameter(factor, requires_grad))
    for head, head_name in fit.target.tied:
        undo.record(head, head_name)
        _meta_placeholder(head, head_name)
        share_parametrization(head, head_name, plist)
    fit.p.fit_error = error
    if fit.std is not None:
        fit.p.cold_start([getattr(plist, key) for key in names], fit.std)


def _report(plan: Plan, fits: list[_Fit], warm_start: bool) -> None:
    plan.row.status = "converted"
    plan.row.params_after = own_param_count(plan.candidate.module) if plan.candidate else 0
    total = sum(f.sq_norm for f in fits)
    fitted = warm_start and all(f.p.fit_error is not None for f in fits)
    plan.row.warm_start_error = (math.sqrt(sum(f.p.fit_error ** 2 * f.sq_norm for f in fits) / total)
                                 if total > 0 else 0.0) if fitted else None


def _dense(target: Target) -> Tensor:
    return target.owner._parameters[target.tensor].detach()


def apply_in_place(plans: list[Plan], warm_start: bool) -> None:
    """Convert the planned layers one by one: fit the factors to the dense weight, parametrize the layer, drop the
    dense weight (freed unless something else holds it). A layer is converted entirely or not at all; on an
    unexpected failure it raises `PartialConversionError` (an interrupt is re-raised with a note) saying which
    layers are converted and what to do."""
    done: list[str] = []
    for k, plan in enumerate(plans):
        try:
            fits = [_fit(t, plan.settings, _dense(t), warm_start) for t in plan.targets]
            undo = Undo()
            try:
                for fit in fits:
                    _install(fit, undo)
            except BaseException:
                undo.undo()
                raise
        except BaseException as e:
            left = [p.row.name for p in plans[k:]]
            msg = (f"converting {plan.row.name!r} ({plan.row.kind}) failed: {e}. The model is partly converted: "
                   f"{len(done)} layer(s) are Kronecker layers ({_names(done)}), {len(left)} are unchanged "
                   f"({_names(left)}). Convert it again with the same settings to convert the rest (converted "
                   "layers are skipped), or rebuild the model.")
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: keep their type
                e.add_note(msg)
                raise
            raise PartialConversionError(msg, done, left) from e
        _report(plan, fits, warm_start)
        done.append(plan.row.name)
        del fits, undo  # the dense weight goes as soon as nothing refers to it
    _finish(plans)


def _names(names: list[str], most: int = 6) -> str:
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(map(repr, names[:most])) + more if names else "none"
