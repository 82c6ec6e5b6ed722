"""kronify.convert: give every weight-bearing layer of a model a Kronecker-parametrized weight, and report it.

Each weight the forward reads (the kinds are one table, `kronify.layer_kinds.KINDS`) gets a `KronParametrization`
(torch.nn.utils.parametrize): the layer keeps its class, forward and hooks, shared layers stay shared, and a weight
under another parametrization gets the Kronecker structure on its original. Conversion first finds and plans
(`kronify.plan`, `kronify.checkpoint`), checking every input and changing nothing, then applies the plans
(`kronify.apply`).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

from torch import nn

from kronify.apply import apply_in_place, apply_plans
from kronify.budget_plan import budget_config
from kronify.calibration import read_batches
from kronify.calibration.apply import apply_calibrated
from kronify.calibration.config import CalibrationConfig
from kronify.checkpoint import Checkpoint, match_checkpoint
from kronify.config import KronConfig
from kronify.io import remember_config
from kronify.parametrization import is_kron
from kronify.plan import Selector, check_finite, make_plans
from kronify.report import ConversionReport, count_params

__all__ = ["convert", "is_kron"]


def _resolve_config(n: int | KronConfig, config: KronConfig | None, kwargs: dict) -> KronConfig:
    if isinstance(n, KronConfig):
        if config is not None:
            raise TypeError("convert: pass the KronConfig once (as `n` or as `config=`), not twice")
        config, n = n, 2
    given = {k: v for k, v in kwargs.items() if v != KronConfig.__dataclass_fields__[k].default and
             not (k == "overrides" and not v)}
    if config is None:
        return KronConfig(n=n, **kwargs)  # validates every setting
    if given or n != 2:
        raise TypeError(f"convert: with a KronConfig, set {sorted(given) or ['n']} in the config, not as arguments")
    if not isinstance(config, KronConfig):
        raise TypeError(f"convert: config must be a KronConfig, got {type(config).__name__}")
    return config


def convert(
    model: nn.Module,
    n: int | KronConfig = 2,
    *,
    config: KronConfig | None = None,
    terms: int | None = None,
    algebra: str = "learned",
    warm_start: bool = False,
    include: Any = None,
    exclude: Any = None,
    overrides: Any = None,
    strict: bool = False,
    budget: float | None = None,
    embeddings: bool | None = None,
    calibration: Any = None,
    calibration_config: CalibrationConfig | None = None,
    inplace: bool = True,
    example_inputs: Any = None,
    checkpoint: str | os.PathLike | None = None,
) -> ConversionReport:
    """Give the weights of `model`'s Linear / Conv* / ConvTranspose* / Conv1D / MultiheadAttention layers
    the Kronecker structure W = Σ_t A_t ⊗ F_t.

    Settings come from a `KronConfig` (`convert(model, cfg)` or `config=cfg`) or from the keyword
    arguments of the same names (see KronConfig): n, terms, algebra, warm_start, include / exclude
    (module names, dotted suffixes or "re:<regex>"; exclude wins), overrides ({name | "re:regex" | module
    type: dict(n=, terms=, algebra=) or None to leave it dense}; a pattern matching nothing warns) and strict
    (raise if a selected layer cannot be converted: dims not divisible by n, depthwise, tied or
    non-parameter weights).

    calibration: an iterable of model inputs (tensors, tuples of positional inputs or dicts of keyword
    inputs, as the model takes them; up to `max_batches` are read from an endless generator). With
    warm_start=True each converted layer's factors are then fitted to minimise its output error on these
    inputs, ‖(W − Σ A_t⊗F_t) X‖_F, and the better of that and the weight-only fit on held-out batches is
    kept (see CalibrationConfig, set by `calibration_config`; the report shows both errors per layer).

    inplace=False converts a deep copy (`report.model`). example_inputs: a tensor or tuple run through the
    model when torch.fx cannot trace it, to learn which layers run (buffers are restored afterwards).

    checkpoint: a safetensors checkpoint of the dense model (a `*.safetensors` file, a Hugging Face sharded
    `*.safetensors.index.json`, or a directory with either) whose tensors replace the model's: typically for a
    model built on the meta device. Each converted layer's factors are made from its tensor, read one at a time
    and then dropped; every other parameter and buffer is read in (in the model's dtype; tied weights stay tied).
    The peak memory is about the converted model plus the largest layer. Not with calibration or budget, which need
    the whole dense model: load it first.

    Frozen weights give frozen factors; biases are not touched. Every check on the input (settings, dims,
    non-finite weights, a checkpoint's keys, shapes and dtypes) runs before anything changes, and then raises
    leaving `model` unchanged. Without calibration the layers are then converted one at a time, each dense weight
    freed as its factors are made (peak memory: the model plus one layer's factors); should that fail unexpectedly
    (out of memory, an interrupt), a `kronify.apply.PartialConversionError` names the converted layers, and
    converting again with the same settings finishes the rest. From a checkpoint, and with calibration, any error
    leaves `model` unchanged. Returns a ConversionReport (`.model` is the converted model, `.config` the KronConfig).
    The model remembers the KronConfig (`model.kronify_config`: `kronify.save` stores it) and a transformers
    model's `save_pretrained` writes a kronify save, which `kronify.from_pretrained` loads.
    """
    config = _resolve_config(n, config, dict(terms=terms, algebra=algebra, warm_start=warm_start, include=include,
                                             exclude=exclude, overrides=overrides or {}, strict=strict,
                                             budget=budget, embeddings=embeddings,
                                             calibration=calibration_config))
    if calibration is not None and not config.warm_start:
        raise ValueError("convert: calibration fits the warm start to the inputs; pass warm_start=True with it")
    if checkpoint is not None and (calibration is not None or config.budget is not None):
        raise ValueError("convert: calibration and budget need the whole dense model; load the checkpoint into the "
                         "model first (e.g. from_pretrained) and convert it without checkpoint=")
    source = Checkpoint(checkpoint) if checkpoint is not None else None  # reads headers only
    if calibration is not None:  # read once: a one-shot iterator serves the budget and the fit alike
        calibration = read_batches(calibration, config.calibration or CalibrationConfig())
    target = model if inplace else copy.deepcopy(model)
    params_before = count_params(target)
    requested = config.budget
    if requested is not None:
        config = budget_config(target, config, calibration)
    selector = Selector(config)
    plans, analysis = make_plans(target, config, selector, example_inputs)
    if requested is not None:
        for plan in plans:
            if plan.row.reason.startswith("override 're:"):
                plan.row.reason = f"kept dense by the budget ({requested})"

    unused = selector.unused()
    if unused:
        warnings.warn(f"convert: {'; '.join(unused)} matched no layer", UserWarning, stacklevel=2)
    problems = [p for p in plans if p.problem]
    if config.strict and problems:
        raise ValueError(f"strict=True: {len(problems)} selected layer(s) cannot be converted: "
                         + "; ".join(f"{p.row.name} ({p.row.reason})" for p in problems))
    todo = [p for p in plans if p.settings is not None]
    if not todo and requested is None:
        why = "; ".join(f"{p.row.name}: {p.row.reason}" for p in plans[:8]) or "no layers with weights"
        extra = f" ({'; '.join(unused)} matched no layer)" if unused else ""
        raise ValueError(f"nothing to convert{extra}: {why}{' ...' if len(plans) > 8 else ''}")
    if source is not None:
        loading = match_checkpoint(target, source, todo)
        staged = loading.stage()  # the tensors that stay dense, read before any change
        apply_plans(todo, config.warm_start, loading.read)
        loading.assign(staged)
    elif calibration is None or not todo:
        check_finite(todo)
        apply_in_place(todo, config.warm_start)
    else:
        config = apply_calibrated(target, todo, config, calibration)
    remember_config(target, config)
    return ConversionReport(model=target, rows=[p.row for p in plans], params_before=params_before,
                            params_after=count_params(target), traced=analysis.traced, trace_error=analysis.error,
                            config=config, budget=requested)
