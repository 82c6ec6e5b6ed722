"""Analysis of a model: which layers run, and how often (for `kronify.convert`), and its FLOPs (`count_flops`).

torch.fx symbolic tracing records every call of a leaf module as a ``call_module`` node, so it tells
which candidate layers the forward actually uses and which are called at several places (a shared
module, e.g. the denoiser of an unrolled network). Models with data-dependent control flow do not
trace; then, if example inputs are given, one forward pass with pre-hooks counts the calls instead,
and otherwise nothing is known about calls (layers are found by `named_modules()` alone).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kronify.parametrization import kron_parametrizations


@dataclass
class Analysis:
    """Outcome of analysing one model.

    `calls` maps id(module) -> number of call sites (fx) or calls (hooks); None when unknown.
    `weight_reads` holds ids of modules whose parameters the traced code reads directly.
    """

    traced: bool
    method: str  # "fx" | "hooks" | "modules"
    error: str | None = None
    calls: dict[int, int] | None = None
    weight_reads: set[int] = field(default_factory=set)


class _Tracer(torch.fx.Tracer):
    """Default fx tracer that also keeps the given candidate layers as leaves."""

    def __init__(self, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self._is_leaf = is_leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_leaf(m) or super().is_leaf_module(m, qualname)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _default_concrete_args(model: nn.Module) -> dict[str, Any]:
    """Forward parameters that have defaults are traced with those defaults (e.g. mask=None)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def _fx(model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> Analysis:
    tracer = _Tracer(is_leaf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(model, concrete_args=_default_concrete_args(model) or None)
    calls: dict[int, int] = {}
    reads: set[int] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            calls[id(m)] = calls.get(id(m), 0) + 1
        elif node.op == "get_attr" and "." in node.target:
            owner = node.target.rsplit(".", 1)[0]
            try:
                reads.add(id(model.get_submodule(owner)))
            except AttributeError:
                pass
    return Analysis(traced=True, method="fx", calls=calls, weight_reads=reads)


def _hooks(model: nn.Module, candidates: list[nn.Module], example_inputs: Any) -> dict[int, int]:
    """Count calls of `candidates` in one no-grad forward; buffers (e.g. BN statistics) are restored."""
    calls = {id(m): 0 for m in candidates}

    def pre_hook(m, _args):
        calls[id(m)] += 1

    handles = [m.register_forward_pre_hook(pre_hook) for m in candidates]
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
    return calls


def analyse(
    model: nn.Module,
    candidates: list[nn.Module],
    is_leaf: Callable[[nn.Module], bool],
    example_inputs: Any = None,
) -> Analysis:
    """Trace `model` with torch.fx; on failure fall back to a hooked forward pass (if example inputs
    are given) or to nothing. Never raises for a model that does not trace."""
    try:
        return _fx(model, is_leaf)
    except Exception as e:  # any tracing failure means: fall back
        error = _short(e)
    if example_inputs is not None:
        try:
            return Analysis(traced=False, method="hooks", error=error, calls=_hooks(model, candidates, example_inputs))
        except Exception as e:
            error = f"{error}; forward on example_inputs failed too: {_short(e)}"
    return Analysis(traced=False, method="modules", error=error)


def count_flops(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Forward FLOPs of `model` (dense or converted) on `example_inputs` (a tensor or a tuple of positional
    inputs), counted by torch.utils.flop_counter: 2 per multiply-add of matmuls, convolutions and attention.

    `forward` leaves out the build of the dense weights from the factors (Σ A⊗F): converted layers run the
    dense op, so it equals the dense model's count (FLOPs do not drop; parameters do). The build is paid once
    per weight update, not per sample: `weight_rebuild`, 2·terms FLOPs per dense weight entry. The model is
    run in eval mode without gradients, on the model itself (no copy); its modes are restored and no built
    weight stays cached. torch's fused attention fast path, one op the counter cannot see, is turned off.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    modes = [(m, m.training) for m in model.modules()]
    kron = [(owner, name, p) for _, owner, name, p in kron_parametrizations(model)]
    fast = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            for owner, name, _ in kron:
                getattr(owner, name)  # builds and caches W in eval mode, so the count sees no build
            with FlopCounterMode(display=False) as counter:
                model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m, mode in modes:
            m.training = mode
        for _, _, p in kron:
            p.clear_cache()
    rebuild = sum(2 * p.terms * math.prod(p.shape) for _, _, p in kron)  # a multiply-add per term and entry
    return {"forward": counter.get_total_flops(), "weight_rebuild": rebuild}
