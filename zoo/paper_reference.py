"""The Kronecker paper's Table 1 parameter and FLOP counts beside ours for the official configurations.

`python -m zoo.paper_reference [--size 320] [--json]` (also `python -m zoo.summary --paper`) prints, for each
configuration of the paper's official code (Whethe/HyperKron-MRI-Recon `options/*/train_*.json`) that the zoo
builds, our parameter count and our forward FLOPs of one 2×320×320 slice, both as 2·MAC (what
torch.utils.flop_counter reports) and as MAC (what thop-style counters report), next to the paper's Table 1
values, and says plainly whether each matches. `reconciliation_table()` returns the rows and the markdown.

Counting conventions: parameters are every parameter element of the model (a Kronecker layer: its A and F
factors and bias, as the official PHConv/PHMLinear hold them). FLOPs count convolutions, matmuls and
attention (not FFTs, normalisations or elementwise ops). A Kronecker model applies the same dense
convolutions and matmuls as its dense model (W = Σ A⊗F is rebuilt once per weight update, not per slice),
so its per-slice FLOPs are those of the dense configuration, which is what is counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from torch import nn

import kronify
import zoo
from kronify.mri.paper import OFFICIAL_CONFIGS, TABLE1, OfficialConfig, PaperRow
from zoo.counting import count_flops, count_params


# The numbers and configurations are kronify.mri.paper's (written once there); PAPER_TABLE1 holds the rows
# with counts.
PAPER_TABLE1: dict[str, PaperRow] = {label: row for label, row in TABLE1.items() if row.params_m is not None}

PARAMS_TOLERANCE = 0.01  # relative: a count "matches" within 1 % (re-implementations differ in small layers)
FLOPS_TOLERANCE = 0.05   # relative, for FLOPs


def build(config: OfficialConfig) -> nn.Module:
    """The model of `config`: `zoo.create(model)`, converted by `kronify.convert` with the model's
    KRON_SETTINGS at `n` (and `overrides`) when `n` is set."""
    dense = zoo.create(config.model, **config.builder_kwargs)
    if config.n is None:
        return dense
    settings = zoo.kron_settings(config.model)
    settings["n"] = config.n
    if config.overrides:
        settings["overrides"] = {**(settings.get("overrides") or {}), **config.overrides}
    kwargs = {k: v for k, v in settings.items() if v is not None}
    return kronify.convert(dense, **kwargs).model


def _relative(ours: float, paper: float) -> float:
    return ours / paper - 1.0


def params_verdict(params: int, paper: PaperRow | None, table: dict[str, PaperRow] = PAPER_TABLE1) -> str:
    """Plain words: does `params` match the paper row's count; if not, does it match another row's?"""
    if paper is None:
        return "not in Table 1"
    ours_m = params / 1e6
    rel = _relative(ours_m, paper.params_m)
    if abs(rel) <= PARAMS_TOLERANCE:
        return f"matches ({rel:+.1%})"
    others = [r.label for r in table.values()
              if r.label != paper.label and abs(_relative(ours_m, r.params_m)) <= PARAMS_TOLERANCE]
    text = f"does not match: ours is {ours_m / paper.params_m:.2f}× the table's"
    if others:
        text += f"; it matches the table's {' / '.join(others)} count instead"
    return text


def flops_verdict(flops: int, paper: PaperRow | None) -> str:
    """Plain words: does the paper's FLOPs value equal ours as 2·MAC, as MAC, or neither."""
    if paper is None:
        return "not in Table 1"
    for value, name in ((flops / 1e9, "2·MAC"), (flops / 2e9, "MAC")):
        rel = _relative(value, paper.gflops)
        if abs(rel) <= FLOPS_TOLERANCE:
            return f"matches as {name} ({rel:+.1%})"
    return f"does not match: ours is {flops / 2e9 / paper.gflops:.2f}× the table's as MAC"


def reconciliation_rows(size: int = 320, configs: Sequence[OfficialConfig] | None = None) -> list[dict[str, Any]]:
    """One dict per configuration (default `OFFICIAL_CONFIGS`): our params and FLOPs (2·MAC and MAC) at
    size×size, the paper's values, and the verdicts."""
    rows = []
    for config in OFFICIAL_CONFIGS if configs is None else configs:
        model = build(config)
        params = count_params(model)
        if config.n is not None:  # count the dense configuration: the same convolutions and matmuls
            model = zoo.create(config.model, **config.builder_kwargs)
        flops = count_flops(model, size)
        del model
        paper = PAPER_TABLE1.get(config.paper) if config.paper else None
        rows.append(dict(
            label=config.label, model=config.model, n=config.n, source=config.source, size=size,
            params=params, flops=flops, macs=flops // 2,
            paper_label=paper.label if paper else None,
            paper_params_m=paper.params_m if paper else None, paper_gflops=paper.gflops if paper else None,
            params_verdict=params_verdict(params, paper), flops_verdict=flops_verdict(flops, paper)))
    return rows


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, with the counting conventions below it."""
    size = rows[0]["size"] if rows else 320
    head = ("Configuration", "Params (M)", f"GFLOPs (2·MAC) @{size}²", f"GMAC @{size}²", "Table 1 row",
            "Table 1 params (M)", "Table 1 FLOPs (G)", "Params", "FLOPs")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = r["paper_label"] is not None
        cells = (r["label"], f"{r['params'] / 1e6:.3f}", f"{r['flops'] / 1e9:.3f}", f"{r['macs'] / 1e9:.3f}",
                 r["paper_label"] or "-", f"{r['paper_params_m']:.3f}" if paper else "-",
                 f"{r['paper_gflops']:.3f}" if paper else "-", r["params_verdict"], r["flops_verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Ours: every parameter element (Kronecker layers: A, F and bias); FLOPs of one 2×{size}×{size} slice by "
        "torch.utils.flop_counter (convolutions, matmuls, attention; not FFTs, norms or elementwise ops), "
        "given as 2·MAC and as MAC = half of it. A Kronecker model's per-slice FLOPs equal its dense "
        "configuration's. The paper does not state its FLOP convention or input size.",
    ]
    return "\n".join(lines)


def reconciliation_table(size: int = 320, configs: Sequence[OfficialConfig] | None = None
                         ) -> tuple[list[dict[str, Any]], str]:
    """(rows, markdown): our counts of the official configurations beside the paper's Table 1."""
    rows = reconciliation_rows(size, configs)
    return rows, format_markdown(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.paper_reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320, help="slice size H = W for FLOPs (default 320)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be positive, got {args.size}")
    rows, markdown = reconciliation_table(args.size)
    print(json.dumps(rows, indent=1) if args.json else markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
