"""Calibrated warm start: fit each converted layer's factors to the inputs it sees on calibration batches.

`convert(model, warm_start=True, calibration=batches)` runs the batches through the model (eval mode, no
grad) with forward pre-hooks on the converted layers, accumulates each layer's input second moment
batch by batch (`Moments`), and refits the layer's factors in that metric (`fit_weight`).

- sequential (the default): layers are calibrated in the order the forward first calls them, each on the
  outputs of the already calibrated layers before it, one pass over the batches per layer (a pass stops at
  the layer when the layer runs once per forward);
- parallel: one pass over the dense model collects every layer's statistics, then all are fitted.
The last `holdout` share of the batches only scores the fits: the kept fit is the best on them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kronify.batches import call_model, iterate_batches, move_batch
from kronify.calibration.config import CalibrationConfig
from kronify.calibration.inputs import Moments, input_rows
from kronify.calibration.layer_fit import LayerFit, fit_weight, rms
from kronify.layer_kinds import InputView, kind_of

__all__ = ["CalibrationLayer", "LayerFit", "calibrate", "collect", "first_calls", "read_batches"]

_QKV = ("query", "key", "value")


@dataclass
class CalibrationLayer:
    """One converted layer: its module (hooked), its weights (owner, tensor name, chunks) and their values
    before conversion. `skip` says why it keeps the weight-only fit ("" when it is calibrated)."""

    name: str
    module: nn.Module
    weights: list[tuple[nn.Module, str, int]]
    dense: list[Tensor]
    skip: str = ""
    views: list[InputView] = field(default_factory=list)
    fit: list[Moments] = field(default_factory=lambda: [Moments() for _ in range(3)])
    held: list[Moments] = field(default_factory=lambda: [Moments() for _ in range(3)])

    def __post_init__(self) -> None:
        kind = kind_of(self.module)
        views = [kind.view(self.module, tensor, chunks) for _, tensor, chunks in self.weights]
        self.skip = self.skip or next((v for v in views if isinstance(v, str)), "")
        if not self.skip:
            self.views = views

    def reset(self) -> None:
        self.fit = [Moments() for _ in range(3)]
        self.held = [Moments() for _ in range(3)]


def read_batches(batches: Iterable[Any], cfg: CalibrationConfig) -> list[Any]:
    """The first `cfg.max_batches` batches of any iterable (an endless generator included), as a list."""
    got = list(itertools.islice(iterate_batches(batches, "calibration"), cfg.max_batches))
    if not got:
        raise ValueError("calibration: the batches are empty; pass at least one batch of model inputs")
    return got


def _n_held(count: int, cfg: CalibrationConfig) -> int:
    """Held-out batches: the last holdout share, at least one and never all of them (none for one batch)."""
    return 0 if count < 2 or cfg.holdout == 0 else min(count - 1, max(1, round(count * cfg.holdout)))


@contextlib.contextmanager
def _inference(model: nn.Module):
    """Eval mode and no grad for the calibration passes; every module's training flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the only layer being calibrated has seen its input."""


def _device(model: nn.Module) -> torch.device | None:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else None


def _run(model: nn.Module, batch: Any, index: int) -> None:
    try:
        call_model(model, move_batch(batch, _device(model)))
    except _Stop:
        pass
    except Exception as e:
        raise ValueError(f"calibration: the model failed on calibration batch {index} ({type(e).__name__}: {e}); "
                         "batches must be model inputs: a tensor, a tuple of positional inputs or a dict of "
                         "keyword inputs") from e


def first_calls(model: nn.Module, layers: list[CalibrationLayer], batch: Any) -> dict[int, int]:
    """Run one batch and return {id(layer module): calls}, in the order the layers are first called."""
    calls: dict[int, int] = {}
    handles = [layer.module.register_forward_pre_hook(
        lambda m, args: calls.__setitem__(id(m), calls.get(id(m), 0) + 1)) for layer in layers]
    try:
        with _inference(model):
            _run(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    return calls


def _hook(layer: CalibrationLayer, state: dict, stop: bool):
    sources = sorted({s for view in layer.views for s in view.sources})

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = list(args) + [kwargs[k] for k in _QKV if k in kwargs]
        bucket = layer.held if state["held"] else layer.fit
        rows: dict[int, Tensor] = {}
        for src in sources:
            x = inputs[src]
            if id(x) not in rows:
                rows[id(x)] = input_rows(layer.views[0], module, x)
            bucket[src].add(rows[id(x)])
        if stop:
            raise _Stop

    return hook


def collect(model: nn.Module, layers: list[CalibrationLayer], batches: list[Any], cfg: CalibrationConfig,
            stop: bool = False) -> None:
    """One pass over the batches accumulating the input moments of `layers` (fit, then held-out batches)."""
    state = {"held": False}
    handles = [layer.module.register_forward_pre_hook(_hook(layer, state, stop), with_kwargs=True)
               for layer in layers if not layer.skip]
    n_fit = len(batches) - _n_held(len(batches), cfg)
    try:
        with _inference(model):
            for i, batch in enumerate(batches):
                state["held"] = i >= n_fit
                _run(model, batch, i)
    finally:
        for h in handles:
            h.remove()
    for layer in layers:  # no held-out input (one batch, no holdout, a branch they skip): score on the fit's
        layer.held = [h if not h.empty else f for h, f in zip(layer.held, layer.fit)]


def _fit(layer: CalibrationLayer, cfg: CalibrationConfig, biases: list) -> LayerFit | None:
    if layer.skip or layer.fit[layer.views[0].sources[0]].empty:
        layer.skip = layer.skip or "no calibration input reached it (not called through its forward)"
        return None
    fits = []
    for (owner, tensor, _), dense, view in zip(layer.weights, layer.dense, layer.views):
        plist = owner.parametrizations[tensor]
        p = plist[0]
        factors = [plist.original0, plist.original1] if p.learned else [plist.original]
        bias = kind_of(layer.module).bias(layer.module, tensor)
        if bias is not None:
            biases.append((bias, bias.detach().clone()))
        fits.append(fit_weight(p, factors, dense, bias, view, layer.fit, layer.held, cfg))
    if len(fits) == 1:
        return fits[0]
    return LayerFit("/".join(sorted({f.how for f in fits})), rms([f.output_error for f in fits]),
                    rms([f.weight_fit_error for f in fits]), rms([f.weight_error for f in fits]))


def calibrate(model: nn.Module, layers: list[CalibrationLayer], batches: list[Any], cfg: CalibrationConfig,
              calls: dict[int, int]) -> dict[str, LayerFit | None]:
    """Fit every converted layer to its inputs; returns {layer name: LayerFit or None (skipped)}. In parallel
    mode `collect` has already run on the dense model. On any error every bias is restored and it raises."""
    biases: list[tuple[Tensor, Tensor]] = []
    out: dict[str, LayerFit | None] = {}
    try:
        order = sorted(layers, key=lambda layer: list(calls).index(id(layer.module))
                       if id(layer.module) in calls else len(calls))
        for layer in order:
            if cfg.sequential and not layer.skip:
                layer.reset()
                collect(model, [layer], batches, cfg, stop=calls.get(id(layer.module)) == 1)
            out[layer.name] = _fit(layer, cfg, biases)
            layer.reset()  # free the moments
    except BaseException:
        with torch.no_grad():
            for b, saved in biases:
                b.copy_(saved)
        raise
    return out
