"""The calibrated conversion: the planned layers converted with the nearest Kronecker sum (kronify.apply), then
each refitted to the inputs it sees on the calibration batches (kronify.calibration), all undone on any error."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from kronify.apply import apply_plans
from kronify.calibration import CalibrationLayer, calibrate, collect, first_calls, read_batches
from kronify.calibration.config import CalibrationConfig
from kronify.config import KronConfig
from kronify.plan import Plan

__all__ = ["apply_calibrated"]


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


