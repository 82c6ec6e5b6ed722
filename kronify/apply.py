"""Carry out conversion plans: register the Kronecker parametrizations, warm or cold started, and undo them all
if anything fails (`apply_plans`); with calibration batches, fit the factors to the layers' inputs
(`apply_calibrated`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kronify.calibration import CalibrationLayer, calibrate, collect, first_calls, read_batches
from kronify.config import CalibrationConfig, KronConfig
from kronify.layer_kinds import kind_of
from kronify.parametrization import (KronParametrization, build_once_per_call, is_kron, link_weight,
                                     share_parametrization, unlink)
from kronify.plan import Plan, Target
from kronify.report import own_param_count

__all__ = ["Undo", "apply_calibrated", "apply_plans", "parametrize_weight"]


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
            if not is_kron(owner):
                unlink(owner)
        self._saved.clear()


def parametrize_weight(target: Target, settings: dict, warm_start: bool) -> KronParametrization:
    """Register a KronParametrization on `target`: warm start = the nearest Kronecker sum to the current
    weight; cold start = fresh factors whose W has the current weight's standard deviation."""
    t = target.owner._parameters[target.tensor]
    p = KronParametrization(target.shape, settings["n"], settings["terms"], settings["algebra"], target.chunks)
    p.to(device=t.device, dtype=t.dtype)
    w = t.detach().double()
    std = 0.0 if w.is_meta else float(w.std()) if w.numel() > 1 else float(w.abs().sum())
    p.param_order = list(target.owner._parameters)
    parametrize.register_parametrization(target.owner, target.tensor, p, unsafe=True)
    link_weight(target.owner, target.tensor)
    if not warm_start:
        plist = target.owner.parametrizations[target.tensor]
        p.cold_start([plist.original0, plist.original1] if p.learned else [plist.original], std)
    return p


def _combined_error(ps: list[KronParametrization], weights: list[Tensor]) -> float | None:
    if any(p.fit_error is None for p in ps) or any(w.is_meta for w in weights):
        return None
    sq = [float(w.detach().double().pow(2).sum()) for w in weights]
    return math.sqrt(sum(p.fit_error ** 2 * s for p, s in zip(ps, sq)) / sum(sq)) if sum(sq) > 0 else 0.0


def apply_plans(plans: list[Plan], warm_start: bool) -> Undo:
    """Parametrize every planned target; on any error undo all of it and raise naming the layer."""
    undo = Undo()
    for plan in plans:
        try:
            dense = [t.owner._parameters[t.tensor].detach() for t in plan.targets]
            ps = []
            for t in plan.targets:
                undo.record(t.owner, t.tensor)
                ps.append(parametrize_weight(t, plan.settings, warm_start))
                for head, name in t.tied:
                    undo.record(head, name)
                    share_parametrization(head, name, t.owner.parametrizations[t.tensor])
        except Exception as e:
            undo.undo()
            raise RuntimeError(f"converting {plan.row.name!r} ({plan.row.kind}) failed: {e}") from e
        plan.row.status = "converted"
        plan.row.params_after = own_param_count(plan.candidate.module) if plan.candidate else 0
        plan.row.warm_start_error = _combined_error(ps, dense) if warm_start else None
    for plan in plans:  # only once nothing can fail any more
        kind = kind_of(plan.targets[0].owner)  # None for a ParametrizationList owner
        if kind is not None and kind.reads_weight_often:
            build_once_per_call(plan.targets[0].owner)
    return undo


def apply_calibrated(model: nn.Module, todo: list[Plan], config: KronConfig, batches: Any) -> KronConfig:
    """apply_plans, then fit every converted layer to its calibration inputs (kronify.calibration). The model
    is probed with the first batch before anything changes; on any later error the conversion is undone."""
    cfg = config.calibration or CalibrationConfig()
    batches = read_batches(batches, cfg)
    layers = [CalibrationLayer(p.row.name, p.candidate.module, [(t.owner, t.tensor, t.chunks) for t in p.targets],
                               [t.owner._parameters[t.tensor].detach() for t in p.targets]) for p in todo]
    calls = first_calls(model, layers, batches[0])
    if not cfg.sequential:
        collect(model, layers, batches, cfg)
    undo = apply_plans(todo, warm_start=True)
    try:
        fits = calibrate(model, layers, batches, cfg, calls)
    except BaseException:
        undo.undo()
        raise
    for plan, layer in zip(todo, layers):
        fit = fits[layer.name]
        if fit is None:
            plan.row.fit = f"weight-only: {layer.skip}"
            continue
        plan.row.fit, plan.row.output_error, plan.row.weight_fit_error = fit.how, fit.output_error, fit.weight_fit_error
        plan.row.warm_start_error = fit.weight_error
    return replace(config, calibration=cfg)


