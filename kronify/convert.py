"""kronify.convert: swap a model's Linear / Conv / ConvTranspose / MultiheadAttention layers for
Kronecker (PHM) layers, in place or on a copy, and report what was done.

Conversion runs in three phases so that any error leaves the user's model exactly as it was:
plan (validate arguments, find candidate layers, decide per layer), build (construct every new
layer with `from_dense`), swap (put each new layer at every attribute path of the old one and move
its hooks). Only the swap touches the model, and it cannot fail part-way.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn
from torch.nn.utils import parametrize

from kronify.algebra import LEARNED, resolve_algebra
from kronify.analysis import Analysis, analyse
from kronify.layers import KRON_LAYER_FOR, KronMixin
from kronify.layers.attention import KronMultiheadAttention
from kronify.patterns import Selector, key_repr
from kronify.report import ConversionReport, LayerRow, count_params

__all__ = ["convert", "is_kron"]

_SUPPORTED: tuple[type, ...] = (*KRON_LAYER_FOR, nn.MultiheadAttention)
# Class-body names a subclass may define and still be converted as its torch base class.
_HARMLESS = {"__init__", "reset_parameters", "extra_repr", "__module__", "__qualname__", "__doc__",
             "__annotations__", "__dict__", "__weakref__", "__firstlineno__", "__static_attributes__"}
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_STATE_HOOK_DICTS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def is_kron(module: nn.Module) -> bool:
    """True for kronify's Kronecker layers (attention included)."""
    return isinstance(module, (KronMixin, KronMultiheadAttention))


def _torch_base(module: nn.Module) -> type | None:
    for base in _SUPPORTED:
        if isinstance(module, base):
            return base
    return None


# ---- finding candidates --------------------------------------------------------------------------
@dataclass
class _Candidate:
    module: nn.Module
    paths: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.paths[0]


def find_candidates(model: nn.Module) -> list[_Candidate]:
    """Every distinct supported or Kron layer below `model`, with all attribute paths reaching it.

    Candidates are not descended into (an attention layer's out_proj belongs to the attention).
    A module reachable by several paths (shared) is one candidate with several paths.
    """
    found: dict[int, _Candidate] = {}

    def walk(module: nn.Module, prefix: str, ancestors: tuple[int, ...]) -> None:
        for child_name, child in module._modules.items():
            if child is None or id(child) in ancestors:
                continue
            path = f"{prefix}{child_name}"
            if is_kron(child) or _torch_base(child) is not None:
                found.setdefault(id(child), _Candidate(child)).paths.append(path)
            else:
                walk(child, path + ".", ancestors + (id(child),))

    walk(model, "", (id(model),))
    return list(found.values())


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=True):
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return owners


# ---- per-layer decisions ---------------------------------------------------------------------------
def _kind(module: nn.Module) -> str:
    return type(module).__name__


def _shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.MultiheadAttention):
        return (module.embed_dim, module.kdim, module.vdim)
    w = module.weight
    return tuple(w.shape) if w is not None else ()


def _subclass_problem(module: nn.Module, base: type) -> str | None:
    """Why a subclass of a supported torch layer cannot be converted safely, or None if it can."""
    if parametrize.is_parametrized(module):
        return "has torch.nn.utils.parametrize parametrizations"
    if type(module) is base:
        return None
    own: set[str] = set()
    for klass in type(module).__mro__:
        if klass is base:
            break
        own |= {k for k in vars(klass) if k not in _HARMLESS}
    if "forward" in own or "_conv_forward" in own:
        return f"{type(module).__name__} subclasses {base.__name__} with its own forward"
    if own:
        return f"{type(module).__name__} subclasses {base.__name__} and defines {', '.join(sorted(own))}"
    return None


def _dims_problem(module: nn.Module, n: int) -> str | None:
    """Why the layer's dims do not factor by n (groups taken into account), or None."""
    if isinstance(module, nn.MultiheadAttention):
        dims = {"embed_dim": module.embed_dim, "kdim": module.kdim, "vdim": module.vdim}
    elif isinstance(module, nn.Linear):
        dims = {"out_features": module.out_features, "in_features": module.in_features}
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise transposed conv (groups == in_channels)"
        dims = {"in_channels": module.in_channels, "out_channels/groups": module.out_channels // module.groups}
    else:
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise conv (groups == in_channels)"
        dims = {"out_channels": module.out_channels, "in_channels/groups": module.in_channels // module.groups}
    bad = [f"{k}={v}" for k, v in dims.items() if v % n]
    return f"{' and '.join(bad)} not divisible by n={n}" if bad else None


def _state_problem(module: nn.Module, base: type, owners: dict[int, list[str]], paths: list[str]) -> str | None:
    """Weights the Kron layer could not take over: extra params (weight_norm...), tied or lazy weights."""
    if base is nn.MultiheadAttention:
        tensors = {k: v for k, v in module.named_parameters() if v is not None}
        expected = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                    "bias_k", "bias_v", "out_proj.weight", "out_proj.bias"}
    else:
        tensors = {k: v for k, v in module._parameters.items() if v is not None}
        expected = {"weight", "bias"}
    extra = sorted(set(tensors) - expected)
    if extra:
        return f"unexpected parameters {', '.join(extra)} (weight_norm / spectral_norm?)"
    if base is not nn.MultiheadAttention and "weight" not in tensors:
        return "has no weight parameter"
    if any(isinstance(t, nn.parameter.UninitializedParameter) for t in tensors.values()):
        return "uninitialized lazy module"
    own = {f"{p}.{k}" for p in paths for k in tensors}
    for k, t in tensors.items():
        others = [o for o in owners.get(id(t), []) if o not in own]
        if others:
            return f"{k} is shared with {others[0]} (tied weights)"
    return None


def _call_note(a: Analysis, module: nn.Module, paths: list[str]) -> str:
    notes = []
    if len(paths) > 1:
        notes.append(f"shared: also at {', '.join(paths[1:])}")
    if a.calls is not None:
        calls = a.calls.get(id(module), 0)
        how = "traced forward" if a.traced else "forward on example_inputs"
        if calls == 0 and id(module) not in a.weight_reads:
            notes.append(f"not called by the {how}")
        elif calls > 1:
            notes.append(f"called {calls}x by the {how}")
    return "; ".join(notes)


# ---- the swap ----------------------------------------------------------------------------------------
def _set_path(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def transplant(model: nn.Module, old: nn.Module, new: nn.Module, paths: Iterable[str]) -> None:
    """Put `new` at every path of `old` and hand it `old`'s forward/backward hooks.

    The hook dicts themselves are moved, so RemovableHandles the user holds keep working.
    """
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = old._is_full_backward_hook
    for path in paths:
        _set_path(model, path, new)


def _has_state_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in _STATE_HOOK_DICTS)


# ---- public entry point --------------------------------------------------------------------------------
@dataclass
class _Plan:
    candidate: _Candidate
    row: LayerRow
    settings: dict | None  # None: stays as it is
    problem: bool = False  # skipped for a reason the user did not choose (strict fails on these)


def _validate_settings(settings: dict, where: str) -> int:
    try:
        return resolve_algebra(settings["algebra"], settings["n"], settings["terms"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _plan(
    model: nn.Module, defaults: dict, selector: Selector, example_inputs: Any
) -> tuple[list[_Plan], Analysis]:
    candidates = find_candidates(model)
    owners = _param_owners(model)
    kron_ids = {id(c.module) for c in candidates}
    analysis = analyse(model, [c.module for c in candidates], lambda m: id(m) in kron_ids or is_kron(m),
                       example_inputs)
    plans = []
    for c in candidates:
        m = c.module
        before = count_params(m)
        row = LayerRow(name=c.name, kind=_kind(m), shape=_shape(m), n=None, terms=None,
                       params_before=before, params_after=before, status="skipped")
        plan = _Plan(c, row, None)
        plans.append(plan)
        if is_kron(m):
            row.n, row.terms = m.n, m.terms
            row.reason = "already a Kronecker layer"
            continue
        base = _torch_base(m)
        settings, reason = selector.select(c.paths, m, defaults)
        if settings is None:
            row.reason = reason
            continue
        row.terms = _validate_settings(settings, f"layer {c.name!r} (n={settings['n']}, terms={settings['terms']}, "
                                                 f"algebra={settings['algebra']!r})")
        row.n = settings["n"]
        problem = (_subclass_problem(m, base) or _state_problem(m, base, owners, c.paths)
                   or _dims_problem(m, settings["n"]))
        if problem:
            row.reason, plan.problem = problem, True
            continue
        plan.settings = settings
        row.reason = _call_note(analysis, m, c.paths)
    return plans, analysis


def _build(plan: _Plan, warm_start: bool) -> nn.Module:
    m, s = plan.candidate.module, plan.settings
    cls = KronMultiheadAttention if isinstance(m, nn.MultiheadAttention) else KRON_LAYER_FOR[_torch_base(m)]
    try:
        new = cls.from_dense(m, s["n"], s["terms"], s["algebra"], warm_start=warm_start)
    except Exception as e:
        raise RuntimeError(f"converting {plan.row.name!r} ({_kind(m)}) failed: {e}") from e
    if not any(p.requires_grad for p in m.parameters()):  # a frozen layer stays frozen
        new.requires_grad_(False)
    return new


def convert(
    model: nn.Module,
    n: int = 2,
    *,
    terms: int | None = None,
    algebra: str = LEARNED,
    warm_start: bool = False,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    overrides: Mapping[Any, Mapping[str, Any] | None] | None = None,
    strict: bool = False,
    inplace: bool = True,
    example_inputs: Any = None,
) -> ConversionReport:
    """Replace the Linear / Conv* / ConvTranspose* / MultiheadAttention layers of `model` by Kronecker layers.

    Args:
        n: Kronecker factor size (integer >= 2); layers hold about 1/n of their dense parameters.
        terms: number of Kronecker terms (1..n²; default n); algebra: "learned", "complex" (n=2),
            "quaternion" (n=4).
        warm_start: initialise each layer with the nearest Kronecker sum of its current weight
            (`.warm_start_error` per row); otherwise a fresh init. Biases are always copied.
        include / exclude: module names (exact or dotted suffix) or "re:<regex>" (full match);
            exclude wins. overrides: {name | "re:<regex>" | module type: dict(n=, terms=, algebra=) or
            None to leave that layer dense}. A pattern that matches nothing warns.
        strict: raise if a selected layer cannot be converted (dims not divisible by n, depthwise
            conv, subclass with its own forward, tied or extra weights), listing every such layer.
        inplace: convert `model` itself; False converts a deep copy (`report.model`).
        example_inputs: tensor or tuple passed to forward when torch.fx cannot trace the model, to
            learn which layers run (buffers are restored afterwards).

    Layers reachable by several paths are converted once and stay shared; forward/backward hooks
    move to the new layer; Kron layers already present are left alone. Any error leaves `model`
    unchanged. Returns a ConversionReport (its `.model` is the converted model).
    """
    return _convert(model, n, terms=terms, algebra=algebra, warm_start=warm_start, include=include,
                    exclude=exclude, overrides=overrides, strict=strict, inplace=inplace,
                    example_inputs=example_inputs)[0]


def _convert(
    model: nn.Module, n: int, *, terms, algebra, warm_start, include, exclude, overrides, strict, inplace,
    example_inputs,
) -> tuple[ConversionReport, list[tuple[nn.Module, nn.Module, list[str]]]]:
    """`convert`, also returning the applied swaps (old, new, paths) so that `restore` can undo them."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got n={n!r}")
    defaults = {"n": n, "terms": terms, "algebra": algebra}
    _validate_settings(defaults, "convert")
    selector = Selector(include, exclude, overrides)
    for key, value in selector.overrides.items():
        if value is not None:
            _validate_settings({**defaults, **value}, f"overrides[{key_repr(key)}]")
    if _torch_base(model) is not None or is_kron(model):
        raise TypeError(f"model is itself a {type(model).__name__}; wrap it in a container (e.g. nn.Sequential)")

    target = model if inplace else copy.deepcopy(model)
    params_before = count_params(target)
    plans, analysis = _plan(target, defaults, selector, example_inputs)

    unused = selector.unused()
    for what in unused:
        warnings.warn(f"kronify.convert: {what} matched no layer", UserWarning, stacklevel=3)
    if strict:
        bad = [f"  {p.row.name}: {p.row.reason}" for p in plans if p.problem]
        if bad:
            raise ValueError(f"strict=True: {len(bad)} selected layer(s) cannot be converted:\n" + "\n".join(bad))
    todo = [p for p in plans if p.settings is not None]
    if not todo:
        why = "; ".join(f"{p.row.name}: {p.row.reason}" for p in plans[:8]) or "no Linear/Conv/attention layers"
        extra = f" ({'; '.join(unused)} matched no layer)" if unused else ""
        raise ValueError(f"nothing to convert{extra}: {why}{' ...' if len(plans) > 8 else ''}")

    built = [_build(p, warm_start) for p in todo]  # may raise: the model is still untouched

    swaps = []
    for p, new in zip(todo, built):
        old = p.candidate.module
        transplant(target, old, new, p.candidate.paths)
        swaps.append((old, new, p.candidate.paths))
        p.row.status = "converted"
        p.row.params_after = count_params(new)
        p.row.warm_start_error = new.warm_start_error
        if _has_state_hooks(old):
            p.row.reason = "; ".join(filter(None, [p.row.reason, "state_dict hooks not carried over"]))
    report = ConversionReport(
        model=target,
        rows=[p.row for p in plans],
        params_before=params_before,
        params_after=count_params(target),
        traced=analysis.traced,
        trace_error=analysis.error,
    )
    return report, swaps


def restore(model: nn.Module, swaps: list[tuple[nn.Module, nn.Module, list[str]]]) -> None:
    """Undo `transplant`s: swaps are (old, new, paths) as they were applied."""
    for old, new, paths in reversed(swaps):
        transplant(model, new, old, paths)
