"""Per-layer budget: choose n, the number of terms, or dense for every layer so that the model keeps a requested
share of its parameters with the smallest total error.

Each layer's options are every n that divides both weight dims (2 ≤ n, n⁴ ≤ the weight's size, so A is not
larger than F) with 1..n² terms, and dense. An option's error is the layer's relative squared error, read off
the Van Loan–Pitsianis spectrum: of the weight itself, or with calibration of W·L (L the Cholesky factor of
the layer's input second moment), a proxy for the output error. The allocation is greedy by error removed
per parameter on each layer's lower convex hull of (parameters, error), which is what bisecting a threshold
on that ratio gives, followed by a pass that spends what is left of the budget on the best single upgrades.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kronify.kron import _rearrange
from kronify.parametrization import kron_param_count

__all__ = ["LayerOptions", "allocate", "layer_options", "spectrum_errors"]

MAX_N = 16
TOLERANCE = 0.01


def _divisors(rows: int, cols: int, numel: int) -> list[int]:
    return [n for n in range(2, min(rows, cols, MAX_N) + 1) if rows % n == 0 and cols % n == 0 and n ** 4 <= numel]


def spectrum_errors(W: Tensor, n: int) -> list[float]:
    """Relative squared error of the best 1..n² term Kronecker sums of W (out, in, *kernel) at this n."""
    R = _rearrange(W, n)
    energy = torch.linalg.eigvalsh(R @ R.T).flip(0).clamp_min(0)
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


def _hull(options: list[tuple]) -> list[tuple]:
    """The lower convex hull of (params, error) from the cheapest option to dense, error decreasing."""
    pts = sorted(options, key=lambda o: (o[0], o[1]))
    best: list[tuple] = []
    for o in pts:
        if best and o[1] >= best[-1][1]:
            continue  # costs more and is no better
        while len(best) >= 2:
            (c1, e1, *_), (c2, e2, *_) = best[-2], best[-1]
            if (e1 - e2) * (o[0] - c2) <= (e2 - o[1]) * (c2 - c1):  # best[-1] is not below the chord
                best.pop()
            else:
                break
        best.append(o)
    return best


def allocate(layers: list[LayerOptions], target: int, fixed: int) -> dict[str, tuple[int | None, int | None]]:
    """{layer name: (n, terms)} ((None, None): dense) with fixed + Σ params as close to `target` from below as
    the options allow. Raises ValueError when the target lies outside the reachable range."""
    low = fixed + sum(min(o[0] for o in layer.options) for layer in layers)
    high = fixed + sum(layer.dense for layer in layers)
    if target < low * (1 - TOLERANCE) or target > high * (1 + TOLERANCE):
        raise ValueError(f"budget: {target:,} parameters cannot be reached; this model can keep between "
                         f"{low:,} ({low / high:.3f}) and {high:,} (1.0) of its {high:,} parameters with the "
                         f"selected layers")
    hulls = [_hull(layer.options) for layer in layers]
    at = [0] * len(layers)
    total = low
    heap = [(-(h[0][1] - h[1][1]) / (h[1][0] - h[0][0]), i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        h, k = hulls[i], at[i]
        step = h[k + 1][0] - h[k][0]
        if total + step > target:
            continue  # this layer's next hull step does not fit; its later steps cost even more
        total += step
        at[i] = k + 1
        if k + 2 < len(h):
            heapq.heappush(heap, (-(h[k + 1][1] - h[k + 2][1]) / (h[k + 2][0] - h[k + 1][0]), i))
    chosen = [hulls[i][at[i]] for i in range(len(layers))]
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
