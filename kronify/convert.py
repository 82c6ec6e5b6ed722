"""kronify.convert: give every weight-bearing layer of a model a Kronecker-parametrized weight, in place or
on a copy, and report what was done.

A layer is any module whose forward reads a weight of two or more dims: Linear, Conv1/2/3d,
ConvTranspose1/2/3d and their subclasses (timm's StdConv2d standardizes `self.weight` in its own forward),
transformers' Conv1D, and nn.MultiheadAttention's q/k/v projections (its out_proj is a Linear). Each
weight gets a `KronParametrization` (torch.nn.utils.parametrize): the layer keeps its class, forward and
hooks, shared layers stay shared, and a weight under another parametrization gets the Kronecker structure
on its original.

Conversion runs in three steps so that an error leaves the model exactly as it was: find (candidate
layers and every path to them), plan (validate settings, decide per layer), apply (register the
parametrizations; on any error every registration made so far is undone).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kronify.algebra import resolve_algebra
from kronify.analysis import Analysis, analyse
from kronify.calibration import CalibrationLayer, calibrate, collect, first_calls, read_batches
from kronify.config import CalibrationConfig, KronConfig
from kronify.layer_kinds import dim_names, embedding_problem, weight_names
from kronify.parametrization import (KronParametrization, build_once_per_call, is_kron, link_weight,
                                     own_kron_parametrizations, share_parametrization, unlink)
from kronify.patterns import Selector
from kronify.report import ConversionReport, LayerRow, count_params, own_param_count

__all__ = ["convert", "is_kron"]


# ---- finding candidates --------------------------------------------------------------------------
@dataclass
class _Candidate:
    module: nn.Module
    paths: list[str] = field(default_factory=list)
    inside: bool = False  # below another candidate (an attention's out_proj): fx sees only the outer one

    @property
    def name(self) -> str:
        return self.paths[0]


def find_candidates(model: nn.Module, embeddings: bool = False) -> list[_Candidate]:
    """Every distinct layer with weights (see `weight_names`) at or below `model`, with all paths to it."""
    found: dict[int, _Candidate] = {}

    def visit(module: nn.Module, path: str, ancestors: tuple[int, ...], inside: bool) -> None:
        if weight_names(module, embeddings):
            found.setdefault(id(module), _Candidate(module, inside=inside)).paths.append(path)
            inside = True
        for child_name, child in module._modules.items():
            if child is None or id(child) in ancestors or (child_name == "parametrizations"
                                                           and parametrize.is_parametrized(module)):
                continue
            visit(child, f"{path}.{child_name}" if path else child_name, ancestors + (id(child),), inside)

    visit(model, "", (id(model),), False)
    return list(found.values())


def _param_owners(model: nn.Module) -> dict[int, list[tuple[int, str, nn.Module, str]]]:
    """{id(parameter): [(id(module), dotted name, module, parameter name)]} for every holder of each parameter."""
    owners: dict[int, list[tuple[int, str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=True):
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((id(m), f"{mname}.{pname}" if mname else pname, m, pname))
    return owners


# ---- per-layer decisions ---------------------------------------------------------------------------
@dataclass
class _Target:
    """One tensor to parametrize: `owner.<tensor>` (the layer, or a ParametrizationList for a weight that
    is already parametrized), of `shape`, split into `chunks` along dim 0. `tied`: (module, tensor name) of
    Linear heads that hold the same embedding weight; they share its factors."""

    owner: nn.Module
    tensor: str
    shape: tuple[int, ...]
    chunks: int
    tied: list[tuple[nn.Module, str]] = field(default_factory=list)


def _target(module: nn.Module, name: str, chunks: int, n: int, owners: dict) -> tuple[_Target | None, str]:
    """The tensor behind `module.<name>`, or (None, why it cannot be Kronecker-parametrized)."""
    owner, tensor = module, name
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        shape = tuple(getattr(module, name).shape)
        originals = ["original"] if plist.is_tensor else [k for k in plist._parameters if k.startswith("original")]
        same = [k for k in originals if tuple(getattr(plist, k).shape) == shape]
        if not same:
            return None, f"{name} is parametrized by {type(plist[0]).__name__} with no original of its shape"
        owner, tensor = plist, same[0]
    t = owner._parameters.get(tensor)
    if t is None:
        return None, f"{name} is not a parameter (a weight_norm / spectral_norm hook?)"
    if isinstance(t, nn.parameter.UninitializedParameter):
        return None, "uninitialized lazy module"
    if t.dim() < 2 or not t.is_floating_point():
        return None, f"{name} has shape {tuple(t.shape)} and dtype {t.dtype}, not a float matrix"
    others = [o for o in owners.get(id(t), []) if o[0] != id(owner)]
    tied = [(o[2], o[3]) for o in others if isinstance(o[2], nn.Linear) and o[3] == "weight"]
    if isinstance(module, nn.Embedding) and embedding_problem(module):
        return None, embedding_problem(module)
    if others and not (isinstance(module, nn.Embedding) and len(tied) == len(others)):
        return None, f"{name} is shared with {others[0][1]} (tied weights)"
    rows, cols = t.shape[0] // chunks, t.shape[1]
    bad = [f"{k}={d}" for k, d in zip(dim_names(module, name), (rows, cols)) if d % n]
    if bad:
        depthwise = "depthwise, " if getattr(module, "groups", 1) > 1 and 1 in (rows, cols) else ""
        return None, f"{depthwise}{' and '.join(bad)} not divisible by n={n}"
    return _Target(owner, tensor, tuple(t.shape), chunks, tied if isinstance(module, nn.Embedding) else []), ""


def _call_note(a: Analysis, c: _Candidate) -> str:
    notes = [f"shared: also at {', '.join(c.paths[1:])}"] if len(c.paths) > 1 else []
    if a.calls is not None and not c.inside:
        calls = a.calls.get(id(c.module), 0)
        how = "traced forward" if a.traced else "forward on example_inputs"
        if calls == 0 and id(c.module) not in a.weight_reads:
            notes.append(f"not called by the {how}")
        elif calls > 1:
            notes.append(f"called {calls}x by the {how}")
    return "; ".join(notes)


@dataclass
class _Plan:
    candidate: _Candidate | None  # None: a plan read from a file (kronify.load)
    row: LayerRow
    settings: dict | None = None  # None: stays as it is
    targets: list[_Target] = field(default_factory=list)
    problem: bool = False  # skipped for a reason the user did not choose (strict fails on these)


def _validate(settings: dict, where: str) -> int:
    try:
        return resolve_algebra(settings["algebra"], settings["n"], settings["terms"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _plan(model: nn.Module, config: KronConfig, selector: Selector,
          example_inputs: Any) -> tuple[list[_Plan], Analysis]:
    candidates = find_candidates(model, bool(config.embeddings))
    owners = _param_owners(model)
    ids = {id(c.module) for c in candidates}
    analysis = analyse(model, [c.module for c in candidates], lambda m: id(m) in ids, example_inputs)
    defaults = {"n": config.n, "terms": config.terms, "algebra": config.algebra}
    plans = []
    for c in candidates:
        m = c.module
        names = weight_names(m, bool(config.embeddings))
        w = getattr(m, names[0][0])
        shape = () if w is None or isinstance(w, nn.parameter.UninitializedParameter) else tuple(w.shape)
        kind = parametrize.type_before_parametrizations(m).__name__
        row = LayerRow(name=c.name, kind=kind, shape=shape, n=None, terms=None, params_before=own_param_count(m),
                       params_after=own_param_count(m), status="skipped")
        plan = _Plan(c, row)
        plans.append(plan)
        done = own_kron_parametrizations(m)
        if done:
            row.n, row.terms, row.reason = done[0].n, done[0].terms, "already a Kronecker layer"
            continue
        settings, reason = selector.select(c.paths, m, defaults)
        if settings is None:
            row.reason = reason
            continue
        row.n = settings["n"]
        row.terms = _validate(settings, f"layer {c.name!r} (n={settings['n']}, terms={settings['terms']}, "
                                        f"algebra={settings['algebra']!r})")
        for name, chunks in names:
            target, problem = _target(m, name, chunks, settings["n"], owners)
            if target is None:
                row.reason, plan.problem, plan.targets = problem, True, []
                break
            plan.targets.append(target)
        if not plan.problem:
            plan.settings = settings
            row.reason = _call_note(analysis, c)
    heads = {id(m): p.row.name for p in plans if p.settings for t in p.targets for m, _ in t.tied}
    for plan in plans:
        if plan.candidate is not None and id(plan.candidate.module) in heads:
            plan.row.reason = f"tied to {heads[id(plan.candidate.module)]}: shares its Kronecker factors"
            plan.problem, plan.settings, plan.targets = False, None, []
    return plans, analysis


# ---- apply and undo --------------------------------------------------------------------------------
class _Undo:
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


def parametrize_weight(target: _Target, settings: dict, warm_start: bool) -> KronParametrization:
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


def apply_plans(plans: list[_Plan], warm_start: bool) -> _Undo:
    """Parametrize every planned target; on any error undo all of it and raise naming the layer."""
    undo = _Undo()
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
        if isinstance(plan.targets[0].owner, nn.MultiheadAttention):
            build_once_per_call(plan.targets[0].owner)
    return undo


def _calibrated_apply(model: nn.Module, todo: list[_Plan], config: KronConfig, batches: Any) -> KronConfig:
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


# ---- public entry point --------------------------------------------------------------------------------
def _resolve_config(n: int | KronConfig, config: KronConfig | None, kwargs: dict) -> KronConfig:
    if isinstance(n, KronConfig):
        if config is not None:
            raise TypeError("convert: pass the KronConfig once (as `n` or as `config=`), not twice")
        config, n = n, 2
    given = {k: v for k, v in kwargs.items() if v != KronConfig.__dataclass_fields__[k].default and
             not (k == "overrides" and not v)}
    if config is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an integer >= 2, got n={n!r}")
        return KronConfig(n=n, **kwargs)
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

    Frozen weights give frozen factors; biases are not touched. Any error leaves `model` unchanged.
    Returns a ConversionReport (`.model` is the converted model, `.config` the KronConfig).
    """
    config = _resolve_config(n, config, dict(terms=terms, algebra=algebra, warm_start=warm_start, include=include,
                                             exclude=exclude, overrides=overrides or {}, strict=strict,
                                             budget=budget, embeddings=embeddings,
                                             calibration=calibration_config))
    if calibration is not None and not config.warm_start:
        raise ValueError("convert: calibration fits the warm start to the inputs; pass warm_start=True with it")
    if calibration is not None:  # read once: a one-shot iterator serves the budget and the fit alike
        calibration = read_batches(calibration, config.calibration or CalibrationConfig())
    target = model if inplace else copy.deepcopy(model)
    params_before = count_params(target)
    requested = config.budget
    if requested is not None:
        from kronify.budget_plan import budget_config  # it builds on this module's candidates and targets

        config = budget_config(target, config, find_candidates(target, config.embeddings is not False), _param_owners(target), _target, calibration)
    selector = Selector(config.include, config.exclude, config.overrides)
    plans, analysis = _plan(target, config, selector, example_inputs)
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
    if calibration is None or not todo:
        apply_plans(todo, config.warm_start)
    else:
        config = _calibrated_apply(target, todo, config, calibration)
    return ConversionReport(model=target, rows=[p.row for p in plans], params_before=params_before,
                            params_after=count_params(target), traced=analysis.traced, trace_error=analysis.error,
                            config=config, budget=requested)
