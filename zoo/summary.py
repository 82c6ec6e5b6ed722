"""`python -m zoo.summary [--size 320] [--json] [--models NAME[:key=value,...] ...] [--n N] [--paper]`

For each model and its Kronecker version (`kronify.convert` with the model's KRON_SETTINGS): parameters,
GFLOPs of one 2×size×size slice, the Kronecker/dense parameter ratio, the layers left dense, and the
Kronecker paper's Table 1 values where it has them.

FLOPs come from torch.utils.flop_counter (2 × multiply-accumulates of matmuls, convolutions and
attention; FFTs and elementwise ops are not counted). The forward runs on the meta device, so only
shapes are computed and even SwinMR at 320×320 costs nothing. The Kronecker model is counted after
`kronify.merge` (the same dense ops; the once-per-step weight rebuild Σ A⊗F is not a per-slice cost),
which is why its FLOPs equal the dense model's.

`--paper` prints instead the reconciliation of the paper's Table 1 with our counts of its official
configurations (`zoo.paper_reference`).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
from typing import Any

import zoo
from zoo import paper_reference
from zoo.counting import count_flops, count_params

# The paper's Table 1 row each zoo model is reported as (its "Kronecker U-Net" is the DDPM-style U-Net,
# `unet_ddpm`; fastMRI's U-Net has no row of its own there). "kron" marks rows that report the Kronecker version.
_PAPER_ROW_OF = {"lbunet": ("LB U-Net", False), "efficient_unet": ("Efficient U-Net", False),
                 "swinmr_paper": ("Kronecker SwinMR", True), "unet_ddpm": ("Kronecker U-Net", True)}
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    name: dict(label=label, params_m=paper_reference.PAPER_TABLE1[label].params_m,
               gflops=paper_reference.PAPER_TABLE1[label].gflops, kron=kron)
    for name, (label, kron) in _PAPER_ROW_OF.items()}

DEFAULT_MODELS = zoo.dense_names() + ["swinmr:in_chans=1"]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,key=value' -> (name, {key: value}); values are Python literals."""
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad override {item!r} in {spec!r}; expected key=value")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return name, overrides


def summarize(spec: str, size: int = 320, n: int | None = None) -> dict[str, Any]:
    """One summary row for model spec `spec` (see `parse_spec`)."""
    import kronify

    name, overrides = parse_spec(spec)
    dense = zoo.create(name, **overrides)
    params, flops = count_params(dense), count_flops(dense, size)
    del dense
    kron, report = zoo.create_kron(name, n=n, **overrides)
    merge = getattr(kronify, "merge", None)
    kron_params = count_params(kron)
    kron_flops = count_flops(merge(copy.deepcopy(kron)) if merge else kron, size)
    paper = PAPER_TABLE1.get(name) if not overrides else None
    return dict(
        name=spec, params=params, gflops=flops / 1e9, kron_params=kron_params, kron_gflops=kron_flops / 1e9,
        kron_ratio=kron_params / params, n=n or zoo.kron_settings(name)["n"],
        left_dense=report.skipped, paper=paper)


def format_table(rows: list[dict[str, Any]], size: int) -> str:
    """A readable table of `summarize` rows, the paper's values beside them."""
    head = ("model", "params M", f"GFLOPs@{size}", "kron params M", "kron GFLOPs", "kron/dense",
            "paper (Table 1)", "left dense")
    lines = []
    for r in rows:
        p = r["paper"]
        paper = f"{p['label']}: {p['params_m']:.3f} M, {p['gflops']:.3f} G" if p else ""
        lines.append((r["name"], f"{r['params'] / 1e6:.4f}", f"{r['gflops']:.3f}", f"{r['kron_params'] / 1e6:.4f}",
                      f"{r['kron_gflops']:.3f}", f"{r['kron_ratio']:.3f}", paper, str(len(r["left_dense"]))))
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines]
    out.append("")
    out.append("FLOPs: torch.utils.flop_counter, 2·MAC, one 2×%d×%d slice (FFTs not counted; the Kronecker "
               "weight rebuild is per step, not per slice)." % (size, size))
    out.append("Layers the Kronecker versions keep dense, and why:")
    for r in rows:
        by_reason: dict[str, list[str]] = {}
        for layer, why in r["left_dense"].items():
            by_reason.setdefault(why, []).append(layer)
        for why, layers in by_reason.items():
            shown = ", ".join(layers[:3]) + (f", … ({len(layers)} layers)" if len(layers) > 3 else "")
            out.append(f"  {r['name']}: {why}: {shown}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320, help="slice size H = W (default 320)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="model specs NAME[:key=value,...] (default: every dense model and swinmr:in_chans=1)")
    parser.add_argument("--n", type=int, default=None, help="override every model's Kronecker n")
    parser.add_argument("--paper", action="store_true",
                        help="print the reconciliation with the paper's Table 1 instead (zoo.paper_reference)")
    args = parser.parse_args(argv)
    if args.paper:
        return paper_reference.main(["--size", str(args.size)] + (["--json"] if args.json else []))
    valid = set(zoo.dense_names())
    bad = [m for m in args.models if parse_spec(m)[0] not in valid]
    if bad:
        parser.error(f"unknown model(s) {bad}; valid: {', '.join(zoo.dense_names())}")
    rows = [summarize(spec, args.size, args.n) for spec in args.models]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
