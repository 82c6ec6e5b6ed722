"""Per-layer budget: choose n, the number of terms, or dense for every layer so that the model keeps a requested
share of its parameters with the smallest total error.

Each layer's options are every n that divides both weight dims (2 ≤ n, n⁴ ≤ the weight's size, so A is not
larger than F) with 1..n² terms, and dense. An option's error is the layer's relative squared error, read off
the Van Loan–Pitsianis spectrum: of the weight itself, or with calibration of W·L (L the Cholesky factor of
the layer's input second moment), a proxy for the output error. The allocation minimises the sum of the
layers' errors at the requested size exactly (up to a 1/4096 rounding of the parameter counts) by dynamic
programming, where a greedy pass by error removed per parameter could stop short of the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kronify.nearest import gram
from kronify.parametrization import kron_param_count

__all__ = ["LayerOptions", "allocate", "layer_options", "spectrum_errors"]

MAX_N = 16
TOLERANCE = 0.01


def _divisors(rows: int, cols: int, numel: int) -> list[int]:
    return [n for n in range(2, min(rows, cols, MAX_N) + 1) if rows % n == 0 and cols % n == 0 and n ** 4 <= numel]


def spectrum_errors(W: Tensor, n: int) -> list[float]:
    """Relative squared error of the best 1..n² term Kronecker sums of W (out, in, *kernel) at this n."""
    energy = torch.linalg.eigvalsh(gram(W, n)).flip(0).clamp_min(0)
    total = float(energy.sum())
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[t] = Σ_{s ≥ t} σ_s²
    return [float(tail[r]) / total if total > 0 else 0.0 for r in range(1, n * n)] + [0.0]


@dataclass
class LayerOptions:
    """One layer's options: (params, error, n, terms), dense as (dense params, 0, None, None)."""

    name: str
    options: list[tuple[int, float, int | None, int | None]]

    @property
    def dense(self) -> int:
        return max(o[0] for o in self.options)


def layer_options(name: str, weights: list[tuple[tuple[int, ...], int, Tensor]]) -> LayerOptions:
    """Options of a layer whose weights [(shape, chunks of dim 0, matrix)] share one n and terms. `matrix` is
    the weight itself, or its whitened (out, in·kernel) matrix form, whose spectrum gives the errors; errors of
    several weights and chunks are energy-weighted."""
    dense = sum(math.prod(shape) for shape, _, _ in weights)
    ns = set.intersection(*(set(_divisors(shape[0] // c, shape[1], math.prod(shape) // c))
                            for shape, c, _ in weights))
    options = [(dense, 0.0, None, None)]
    for n in sorted(ns):
        errs = [0.0] * (n * n)
        energy = 0.0
        for _, chunks, matrix in weights:
            for part in matrix.detach().chunk(chunks):
                e = float(part.double().pow(2).sum())
                errs = [a + b * e for a, b in zip(errs, spectrum_errors(part, n))]
                energy += e
        for r in range(1, n * n + 1):
            cost = sum(kron_param_count(shape, n, r, chunks=c) for shape, c, _ in weights)
            if cost < dense:
                options.append((cost, errs[r - 1] / energy if energy > 0 else 0.0, n, r))
    return LayerOptions(name, options)


BUCKETS = 4096


def allocate(layers: list[LayerOptions], target: int, fixed: int) -> dict[str, tuple[int | None, int | None]]:
    """{layer name: (n, terms)} ((None, None): dense) with the smallest total error such that fixed + Σ params
    lies within the tolerance below `target`: a multiple-choice knapsack solved by dynamic programming over the
    parameter counts, rounded up to `BUCKETS` steps (so every solution it finds fits), then a pass that spends
    what the rounding left on the best single upgrades. Raises ValueError when the target lies outside the reachable
    range."""
    low = fixed + sum(min(o[0] for o in layer.options) for layer in layers)
    high = fixed + sum(layer.dense for layer in layers)
    if target < low * (1 - TOLERANCE) or target > high * (1 + TOLERANCE):
        raise ValueError(f"budget: {target:,} parameters cannot be reached; this model can keep between "
                         f"{low:,} ({low / high:.3f}) and {high:,} (1.0) of its {high:,} parameters with the "
                         f"selected layers")
    free = max(target - fixed, 0)
    step = max(free / BUCKETS, 1e-9)
    size = int(free / step) + 1 + len(layers)  # rounding up adds less than one step a layer
    best = np.full(size, np.inf)  # least error so far at each rounded cost (index = cost in steps)
    best[0] = 0.0
    spent = np.zeros(size)  # the exact parameters of that solution
    picks = []
    for layer in layers:
        new, new_spent = np.full(size, np.inf), np.zeros(size)
        pick = np.full(size, -1, dtype=np.int32)
        for k, (cost, err, *_) in enumerate(layer.options):
            c = int(np.ceil(cost / step - 1e-9))
            if c >= size:
                continue
            cand = best[: size - c] + err
            better = cand < new[c:]
            new[c:][better], pick[c:][better] = cand[better], k
            new_spent[c:][better] = spent[: size - c][better] + cost
        best, spent = new, new_spent
        picks.append(pick)
    if not (np.isfinite(best) & (fixed + spent <= target)).any():  # even the cheapest options exceed it
        chosen = [min(layer.options, key=lambda o: o[0]) for layer in layers]
    else:
        # least error among the solutions within the tolerance below the target, else among all that fit
        fits = np.isfinite(best) & (fixed + spent <= target)
        near = fits & (fixed + spent >= (1 - TOLERANCE) * target)
        at = int(np.argmin(np.where(near if near.any() else fits, best, np.inf)))
        chosen = []
        for layer, pick in zip(reversed(layers), reversed(picks)):
            option = layer.options[int(pick[at])]
            chosen.append(option)
            at -= int(np.ceil(option[0] / step - 1e-9))
        chosen.reverse()
    total = fixed + sum(c[0] for c in chosen)
    while True:  # spend the slack: the single option change that removes the most error and still fits
        moves = [(c[1] - o[1], i, o) for i, (layer, c) in enumerate(zip(layers, chosen))
                 for o in layer.options if c[1] - o[1] > 0 and 0 < o[0] - c[0] <= target - total]
        if not moves:
            break
        _, i, o = max(moves, key=lambda m: m[0])
        total += o[0] - chosen[i][0]
        chosen[i] = o
    return {layer.name: (c[2], c[3]) for layer, c in zip(layers, chosen)}


def within(total: int, target: int) -> bool:
    """True when `total` is within the budget tolerance (±1 %) of `target`."""
    return math.isclose(total, target, rel_tol=TOLERANCE)
