"""Hot-path benchmark: what telling "inside forward" from "outside" costs per call, for each design measured.

Run from the repo root: `python -m benchmarks.hot_path [--quick]`. Writes benchmarks/results/hot_path.{json,md}.
One thread, timed by the thread's CPU time (robust to other processes on a shared machine), all variants of a
case interleaved (ABBA) in one process; reported: median µs per call and the overhead over the dense layer.

Designs (each a converted copy of the same layer):
- `dense`: the torch layer;
- `parametrize`: torch's parametrization alone (the raw property; no link, so in-place edits from outside would
  be lost): the floor for any design;
- `frame getter` (kronify's default): the property looks at the reading frame; no hooks;
- `hooks`: the previous design, emulated exactly: a forward pre-hook and an always-called post-hook counting a
  module-global depth, the getter checking it, and a class-level `__setattr__` patch;
For nn.MultiheadAttention (its forward reads `in_proj_weight` 3 times in self-attention):
- `build 3x`: no build-once mechanism at all;
- `frame once` (default): the frame getter's per-call build cache;
- `hooks + cached()`: the previous design, forward hooks entering torch's `parametrize.cached()`;
- `user cached()`: the user wrapping the call in `with parametrize.cached():`.
Cases: a training step (forward + backward, no optimizer) at batch 1 of small layers, where per-call overhead
weighs most, and single reads of `layer.weight` from outside forward.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

import kronify
import kronify.linked_weight as lw
from benchmarks._common import RESULTS, interleaved, machine, write_results

_depth = 0


def _enter(module, args):
    global _depth
    _depth += 1


def _exit(module, args, output):
    global _depth
    _depth = max(_depth - 1, 0)


def _assign(self, name, value):
    if isinstance(value, nn.Parameter) and parametrize.is_parametrized(self, name):
        with torch.no_grad():
            self.parametrizations[name].right_inverse(value)
        return
    type(self).__mro__[1].__setattr__(self, name, value)


def _hooks_getter(fget, name):
    def get(self):
        W = fget(self)
        if _depth or type(W) is not torch.Tensor or lw._tracing():
            return W
        return lw.LinkedWeight.link(W, self, name, fresh=W.grad_fn is not None and not parametrize._cache_enabled)

    return get


def _enter_cached(module, args):
    parametrize._cache_enabled += 1


def _exit_cached(module, args, output):
    parametrize._cache_enabled -= 1
    if not parametrize._cache_enabled:
        parametrize._cache.clear()


def variant(dense: nn.Module, design: str) -> nn.Module:
    """A converted copy of `dense` whose read path is `design` (see the module docstring)."""
    layer = copy.deepcopy(dense)
    kronify.convert(nn.Sequential(layer))
    cls = type(layer)
    for name in list(layer.parametrizations):
        prop = vars(cls)[name]
        raw = getattr(prop.fget, "__closure__", None)
        fget = next(c.cell_contents for c in raw if callable(c.cell_contents) and c.cell_contents.__name__
                    == "get_parametrized")
        if design in ("parametrize", "build 3x", "user cached()"):
            setattr(cls, name, property(fget, prop.fset))
        elif design in ("hooks", "hooks + cached()"):
            setattr(cls, name, property(_hooks_getter(fget, name), prop.fset))
    if design in ("hooks", "hooks + cached()"):
        cls.__setattr__ = _assign
        layer.register_forward_pre_hook(_enter)
        layer.register_forward_hook(_exit, always_call=True)
        if isinstance(layer, nn.MultiheadAttention):
            layer.out_proj.register_forward_pre_hook(_enter)
            layer.out_proj.register_forward_hook(_exit, always_call=True)
    if design == "hooks + cached()":
        layer.register_forward_pre_hook(_enter_cached)
        layer.register_forward_hook(_exit_cached, always_call=True)
    return layer


def step_fn(layer: nn.Module, x: torch.Tensor, cached: bool = False):
    params = [p for p in layer.parameters() if p.requires_grad]
    attention = isinstance(layer, nn.MultiheadAttention)

    def step() -> None:
        for p in params:
            p.grad = None
        if cached:
            with parametrize.cached():
                y = layer(x, x, x)[0] if attention else layer(x)
        else:
            y = layer(x, x, x)[0] if attention else layer(x)
        y.sum().backward()

    return step


def infer_fn(layer: nn.Module, x: torch.Tensor, cached: bool = False):
    """Forward in eval mode under no_grad (the built weight comes from the eval cache): per-call overhead only."""
    attention = isinstance(layer, nn.MultiheadAttention)

    def infer() -> None:
        with torch.no_grad(), (parametrize.cached() if cached else contextlib.nullcontext()):
            layer(x, x, x) if attention else layer(x)

    return infer


def read_fn(layer: nn.Module, name: str):
    def read() -> None:
        with torch.no_grad():
            getattr(layer, name)

    return read


CASES = {
    "Linear 8→8, 1 token": (lambda: nn.Linear(8, 8), (1, 8)),
    "Linear 64→64, 1×16 tokens": (lambda: nn.Linear(64, 64), (1, 16, 64)),
    "Linear 512→512, 1×16 tokens": (lambda: nn.Linear(512, 512), (1, 16, 512)),
    "Conv2d 32→32 3×3, 1×16²": (lambda: nn.Conv2d(32, 32, 3, padding=1), (1, 32, 16, 16)),
    "MultiheadAttention 64, 1×16 tokens": (lambda: nn.MultiheadAttention(64, 4, batch_first=True), (1, 16, 64)),
    "MultiheadAttention 256, 4×64 tokens": (lambda: nn.MultiheadAttention(256, 8, batch_first=True), (4, 64, 256)),
}


def run_case(label: str, repeats: int) -> dict:
    factory, shape = CASES[label]
    torch.manual_seed(0)
    dense = factory()
    x = torch.randn(shape)
    attention = isinstance(dense, nn.MultiheadAttention)
    designs = (["build 3x", "frame once", "hooks + cached()", "user cached()"] if attention
               else ["parametrize", "frame getter", "hooks"])
    layers = {d: variant(dense, d) for d in designs}
    fns = {"dense": step_fn(dense, x), **{d: step_fn(m, x, cached=d == "user cached()") for d, m in layers.items()}}
    times = interleaved(fns, repeats, warmup=5, clock=time.thread_time)
    us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    row = {"case": label, "step_us": us, "overhead_us": {k: v - us["dense"] for k, v in us.items() if k != "dense"}}
    evals = {"dense": copy.deepcopy(dense).eval(), **{d: copy.deepcopy(m).eval() for d, m in layers.items()}}
    infer = interleaved({d: infer_fn(m, x, cached=d == "user cached()") for d, m in evals.items()}, repeats,
                        warmup=5, clock=time.thread_time)
    row["infer_us"] = {k: statistics.median(v) * 1e6 for k, v in infer.items()}
    if not attention:
        reads = interleaved({d: read_fn(m, "weight") for d, m in layers.items()}, repeats, warmup=5,
                            clock=time.thread_time)
        row["outside_read_us"] = {k: statistics.median(v) * 1e6 for k, v in reads.items()}
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Hot path: per-call cost of each design (CPU, 1 thread, thread CPU time)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, Python {m['python']}; "
        f"{result['repeats']} interleaved repeats per case, median µs. Step = forward + backward (no optimizer).",
        "",
        "| case | design | train step µs | over dense µs | eval forward µs | over dense µs "
        "| read outside forward µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        inf = r["infer_us"]
        lines.append(f"| {r['case']} | dense | {r['step_us']['dense']:.1f} | | {inf['dense']:.1f} | | |")
        for d, over in r["overhead_us"].items():
            read = r.get("outside_read_us", {}).get(d)
            lines.append(f"| | {d} | {r['step_us'][d]:.1f} | {over:+.1f} | {inf[d]:.1f} | {inf[d] - inf['dense']:+.1f} "
                         f"| {'' if read is None else f'{read:.1f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = args.repeats or (50 if args.quick else 300)
    result = {"machine": machine(), "repeats": repeats, "rows": []}
    for label in CASES:
        result["rows"].append(run_case(label, repeats))
        print(label, {k: round(v, 1) for k, v in result["rows"][-1]["overhead_us"].items()}, flush=True)
    write_results(args.out, "hot_path", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
