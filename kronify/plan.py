"""Find and plan a conversion: which layers a model has (`find_candidates`), and what to do with each (`make_plans`).

Planning changes nothing: it validates every setting and decides per layer which tensors (`Target`) get a
Kronecker parametrization, or why a layer stays as it is (a `LayerRow` reason). `kronify.apply` then carries
the plans out; `kronify.io` builds plans from a file the same way, so both go through one path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from kronify.algebra import resolve_algebra
from kronify.analysis import Analysis, analyse
from kronify.config import KronConfig
from kronify.layer_kinds import kind_of, weight_names
from kronify.parametrization import own_kron_parametrizations
from kronify.patterns import key_matches, key_repr
from kronify.report import LayerRow, own_param_count

__all__ = ["Candidate", "Plan", "Selector", "Target", "check_finite", "find_candidates", "make_plans", "param_owners",
           "target_for"]


class Selector:
    """Decides, per module, whether it is selected and with which settings; remembers which keys matched. Reads
    the include / exclude / overrides of a KronConfig, which validated them."""

    def __init__(self, config: KronConfig) -> None:
        self.include, self.exclude, self.overrides = config.include, config.exclude or [], config.overrides
        self.used: set[tuple[str, Any]] = set()

    def select(self, names: list[str], module: nn.Module, defaults: dict) -> tuple[dict | None, str]:
        """Return (settings, "") for a selected module, or (None, reason) for one the user left out.

        All keys are tested (not only the first hit) so that unused-pattern warnings are exact.
        Exclude wins over include; an override of None skips; matching override dicts are applied
        in order: type keys first, then name keys, each in the order given (later ones win).
        """
        included = True
        if self.include is not None:
            hits = [p for p in self.include if key_matches(names, module, p)]
            self.used.update(("include", p) for p in hits)
            included = bool(hits)
        excl = [p for p in self.exclude if key_matches(names, module, p)]
        self.used.update(("exclude", p) for p in excl)
        matching = [k for k in self.overrides if key_matches(names, module, k)]
        self.used.update(("overrides", k) for k in matching)
        if excl:
            return None, f"excluded by {excl[0]!r}"
        if not included:
            return None, "not matched by include"
        settings = dict(defaults)
        ordered = [k for k in matching if isinstance(k, type)] + [k for k in matching if not isinstance(k, type)]
        for k in ordered:
            if self.overrides[k] is None:
                return None, f"override {key_repr(k)} is None"
            settings.update(self.overrides[k])
        return settings, ""

    def unused(self) -> list[str]:
        """Descriptions of patterns and override keys that matched no module."""
        keys = [("include", p, f"include pattern {p!r}") for p in self.include or []]
        keys += [("exclude", p, f"exclude pattern {p!r}") for p in self.exclude]
        keys += [("overrides", k, f"overrides key {key_repr(k)}") for k in self.overrides]
        return [what for kind, key, what in keys if (kind, key) not in self.used]


@dataclass
class Candidate:
    module: nn.Module
    paths: list[str] = field(default_factory=list)
    inside: bool = False  # below another candidate (an attention's out_proj): fx sees only the outer one

    @property
    def name(self) -> str:
        return self.paths[0]


def find_candidates(model: nn.Module, embeddings: bool = False) -> list[Candidate]:
    """Every distinct layer with weights (see `weight_names`) at or below `model`, with all paths to it."""
    found: dict[int, Candidate] = {}

    def visit(module: nn.Module, path: str, ancestors: tuple[int, ...], inside: bool) -> None:
        if weight_names(module, embeddings):
            found.setdefault(id(module), Candidate(module, inside=inside)).paths.append(path)
            inside = True
        for child_name, child in module._modules.items():
            if child is None or id(child) in ancestors or (child_name == "parametrizations"
                                                           and parametrize.is_parametrized(module)):
                continue
            visit(child, f"{path}.{child_name}" if path else child_name, ancestors + (id(child),), inside)

    visit(model, "", (id(model),), False)
    return list(found.values())


def param_owners(model: nn.Module) -> dict[int, list[tuple[int, str, nn.Module, str]]]:
    """{id(parameter): [(id(module), dotted name, module, parameter name)]} for every holder of each parameter."""
    owners: dict[int, list[tuple[int, str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=True):
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((id(m), f"{mname}.{pname}" if mname else pname, m, pname))
    return owners


@dataclass
class Target:
    """One tensor to parametrize: `owner.<tensor>` (the layer, or a ParametrizationList for a weight that
    is already parametrized), of `shape`, split into `chunks` along dim 0. `tied`: (module, tensor name) of
    Linear heads that hold the same embedding weight; they share its factors."""

    owner: nn.Module
    tensor: str
    shape: tuple[int, ...]
    chunks: int
    tied: list[tuple[nn.Module, str]] = field(default_factory=list)


def target_for(module: nn.Module, name: str, chunks: int, n: int, owners: dict) -> tuple[Target | None, str]:
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
    kind = kind_of(module)
    tied = [(o[2], o[3]) for o in others if isinstance(o[2], nn.Linear) and o[3] == "weight"] if kind.ties_heads else []
    if kind.problem(module):
        return None, kind.problem(module)
    if others and len(tied) != len(others):
        return None, f"{name} is shared with {others[0][1]} (tied weights)"
    rows, cols = t.shape[0] // chunks, t.shape[1]
    bad = [f"{k}={d}" for k, d in zip(kind.dims(module, name), (rows, cols)) if d % n]
    if bad:
        depthwise = "depthwise, " if getattr(module, "groups", 1) > 1 and 1 in (rows, cols) else ""
        return None, f"{depthwise}{' and '.join(bad)} not divisible by n={n}"
    return Target(owner, tensor, tuple(t.shape), chunks, tied), ""


def _call_note(a: Analysis, c: Candidate) -> str:
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
class Plan:
    """What to do with one candidate layer: its report row, its settings (n, terms, algebra) and the tensors to
    parametrize, or no settings when it stays as it is (`row.reason` says why)."""

    candidate: Candidate | None  # None: a plan read from a file (kronify.load)
    row: LayerRow
    settings: dict | None = None  # None: stays as it is
    targets: list[Target] = field(default_factory=list)
    problem: bool = False  # skipped for a reason the user did not choose (strict fails on these)


def make_plans(model: nn.Module, config: KronConfig, selector: Selector,
               example_inputs: Any = None) -> tuple[list[Plan], Analysis]:
    """A Plan for every candidate layer of `model` under `config` (layers chosen by `selector`), and the
    analysis of which layers the forward calls. Raises ValueError naming the layer for invalid settings."""
    candidates = find_candidates(model, bool(config.embeddings))
    owners = param_owners(model)
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
        plan = Plan(c, row)
        plans.append(plan)
        done = own_kron_parametrizations(m)
        if done:
            row.n, row.terms, row.reason = done[0].n, done[0].terms, "already a Kronecker layer"
            continue
        settings, reason = selector.select(c.paths, m, defaults)
        if settings is None:
            row.reason = reason
            continue
        row.n, (terms, algebra) = settings["n"], (settings["terms"], settings["algebra"])
        try:
            row.terms = resolve_algebra(algebra, row.n, terms)
        except ValueError as e:
            raise ValueError(f"layer {c.name!r} (n={row.n}, terms={terms}, algebra={algebra!r}): {e}") from None
        for name, chunks in names:
            target, problem = target_for(m, name, chunks, settings["n"], owners)
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


def check_finite(plans: list[Plan]) -> None:
    """Raise ValueError naming the planned layers whose weights hold inf or nan (checked before anything changes,
    as the layer-by-layer conversion cannot undo the layers before a failing one). One reading pass: a sum is
    finite exactly when every entry is, unless it overflows, which only the element-wise check then settles."""
    bad = []
    for plan in plans:
        for t in plan.targets:
            w = t.owner._parameters[t.tensor].detach()
            if not w.is_meta and not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
                bad.append(f"{plan.row.name} ({t.tensor})")
    if bad:
        raise ValueError(f"weights with inf or nan entries cannot be converted: {', '.join(bad)}")
