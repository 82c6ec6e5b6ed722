"""ConversionReport: what `kronify.convert` did, one row per candidate layer, plus model totals."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from kronify.config import KronConfig


@dataclass
class LayerRow:
    """One convertible layer: converted, or skipped with the reason why.

    `shape` is the dense weight's shape, or (embed_dim, kdim, vdim) for attention. `params_*` count
    the layer's own parameters (attention: all projections and biases). For converted layers,
    `reason` may carry notes (shared paths, call counts); `warm_start_error` is the relative
    Frobenius error of the warm start, None without one. With calibration, `fit` names the kept fit
    ("als", "kron", "weight", "+bias" for the bias correction, or "weight-only: <why>"), `output_error` is its
    relative output error on the held-out calibration inputs and `weight_fit_error` the weight-only fit's.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    n: int | None
    terms: int | None
    params_before: int
    params_after: int
    status: str  # "converted" | "skipped"
    reason: str = ""
    warm_start_error: float | None = None
    fit: str | None = None
    output_error: float | None = None
    weight_fit_error: float | None = None


def _numel(p: nn.Parameter) -> int:
    return 0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel()  # lazy: no size yet


def count_params(module: nn.Module) -> int:
    """Number of distinct parameter elements (shared parameters counted once; lazy ones as 0)."""
    return sum(_numel(p) for p in module.parameters())


def own_param_count(module: nn.Module) -> int:
    """Parameters of `module` itself, its Kronecker factors included, not those of its child layers."""
    params = {id(p): p for p in module.parameters(recurse=False)}
    if "parametrizations" in module._modules:
        params.update((id(p), p) for p in module._modules["parametrizations"].parameters())
    return sum(_numel(p) for p in params.values())


def _fmt_err(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


@dataclass
class ConversionReport:
    """Result of `kronify.convert`.

    `params_before` / `params_after` are whole-model totals; `rows` holds one row per layer that
    convert considered (converted or skipped). `traced` says whether torch.fx analysed the model;
    when it did not, `trace_error` says why and layers were found through `named_modules()`.
    """

    model: nn.Module
    rows: list[LayerRow] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    traced: bool = False
    trace_error: str | None = None
    config: KronConfig | None = None
    budget: float | None = None  # the share of parameters requested with convert(budget=...)

    @property
    def converted(self) -> list[str]:
        return [r.name for r in self.rows if r.status == "converted"]

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.reason for r in self.rows if r.status == "skipped"}

    @property
    def ratio(self) -> float:
        """Whole-model params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else math.nan

    @property
    def converted_ratio(self) -> float:
        """params_after / params_before summed over the converted layers only (about 1/n)."""
        rows = [r for r in self.rows if r.status == "converted"]
        before = sum(r.params_before for r in rows)
        return sum(r.params_after for r in rows) / before if before else math.nan

    def __str__(self) -> str:
        calibrated = any(r.fit is not None for r in self.rows)
        extra = ["out_err", "w_out_err", "fit"] if calibrated else []
        head = ["layer", "kind", "shape", "n", "terms", "params", "-> after", "ws_err", *extra, "status"]
        rows = [[r.name, r.kind, "x".join(map(str, r.shape)), "" if r.n is None else str(r.n),
                 "" if r.terms is None else str(r.terms), f"{r.params_before:,}", f"{r.params_after:,}",
                 _fmt_err(r.warm_start_error),
                 *([_fmt_err(r.output_error), _fmt_err(r.weight_fit_error), r.fit or ""] if calibrated else []),
                 f"{r.status}: {r.reason}" if r.reason else r.status] for r in self.rows]
        widths = [max(map(len, column)) for column in zip(head, *rows)]
        right = range(3, len(head) - (2 if calibrated else 1))  # the numbers, from n to the errors

        def fmt(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
                             ).rstrip()

        out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
        out.append(
            f"total: {self.params_before:,} -> {self.params_after:,} params "
            f"(x{self.ratio:.3f}); converted layers x{self.converted_ratio:.3f}; "
            f"{len(self.converted)} converted, {len(self.skipped)} skipped"
        )
        if self.budget is not None:
            out.append(f"budget: {self.budget:.3f} of the parameters requested, {self.ratio:.3f} kept")
        out.append(
            "analysis: torch.fx" if self.traced else f"analysis: named_modules (torch.fx failed: {self.trace_error})"
        )
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (no tensors, no model)."""
        keys = ("converted", "skipped", "params_before", "params_after", "ratio", "converted_ratio", "traced",
                "trace_error", "budget")
        return {"rows": [{**asdict(r), "shape": list(r.shape)} for r in self.rows],
                **{k: getattr(self, k) for k in keys}, "config": self.config.to_dict() if self.config else None}
