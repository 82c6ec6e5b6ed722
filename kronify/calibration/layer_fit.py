"""Fit one converted weight's factors to its inputs, keep the best fit on held-out inputs, write it in place.

Candidates, each scored by its relative output error on the held-out inputs:
- "weight": the nearest Kronecker sum of the weight (what `convert(warm_start=True)` gives without data);
- "weight+bias": the same with the bias correction b += (W − Ŵ)·mean(x);
- "kron": the closed form in the Kronecker-factored metric (for a fixed algebra: the exact least-squares F);
- "als": alternating least squares on the full metric, from the better of the two above.
The kept fit is the best of the candidates the method allows, so it is never worse than the weight-only fit
on the held-out inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kronify.algebra import algebra_matrices
from kronify.calibration.config import CalibrationConfig
from kronify.calibration.inputs import Moments
from kronify.kron_fit import (als_fit, f_step, kron_matrix, metric_factors, output_error2, weight_matrix,
                              whitened_fit)
from kronify.layer_kinds import InputView
from kronify.nearest import nearest_kronecker, project_kronecker
from kronify.parametrization import KronParametrization

__all__ = ["LayerFit", "fit_weight", "rms"]


@dataclass
class LayerFit:
    """What calibration did to one weight: the kept fit, its held-out relative output error, the weight-only
    fit's, and the kept fit's relative error in weight space."""

    how: str
    output_error: float | None
    weight_fit_error: float | None
    weight_error: float


def _to_factors(A: Tensor, F: Tensor, w: Tensor, n: int, transposed: bool) -> tuple[Tensor, Tensor]:
    """Matrix-form factors (r, n, n), (r, p, n2) back to the parametrization's layout for the weight `w`."""
    r, kernel = A.shape[0], w.shape[2:]
    if transposed:
        F = F.reshape(r, w.shape[1] // n, w.shape[0] // n, *kernel).transpose(1, 2)
        A = A.transpose(1, 2)
    return A, F.reshape(r * (w.shape[0] // n), w.shape[1] // n, *kernel)


class _Scorer:
    """Relative held-out output error of a weight error E: E[‖E(x − shift)‖²] / E[‖W x‖²] with x the held-out
    rows, = tr(E Σ Eᵀ) + ‖E(m − shift)‖² for their covariance Σ and mean m (shift: the fit's mean for a fit
    with bias correction, 0 otherwise). Written with Σ, not E[x xᵀ], so a large mean cancels nothing."""

    def __init__(self, W: Tensor, held: Moments, view: InputView) -> None:
        self.cov, self.mean = held.covariance(view.kernel, view.taps_are_outputs)
        self.cov, self.mean = self.cov.to(W.device), self.mean.to(W.device)
        Wm = W @ self.mean
        self.total = output_error2(W, self.cov) + float(Wm @ Wm)

    def __call__(self, E: Tensor, shift: Tensor | None) -> float:
        Em = E @ (self.mean - shift if shift is not None else self.mean)
        err2 = output_error2(E, self.cov) + float(Em @ Em)
        return math.sqrt(max(err2, 0.0) / self.total) if self.total > 0 else 0.0


def _candidates(W: Tensor, p: KronParametrization, C: Tensor, cfg: CalibrationConfig) -> dict[str, tuple]:
    """The factor pairs (A, F) of every fit the method allows, in matrix form."""
    n, r = p.n, p.terms
    if p.learned:
        A0, F0, _ = nearest_kronecker(W, n, r)
    else:
        A0 = algebra_matrices(p.algebra, dtype=torch.float64)
        F0 = project_kronecker(W, A0)[0]
    out = {"weight": (A0, F0)}
    if cfg.method == "weight":
        return out
    n2 = W.shape[1] // n
    if not p.learned:
        C4, P = C.reshape(n, n2, n, n2), (W @ C).reshape(n, -1, n, n2)
        out["kron"] = (A0, f_step(C4, P, A0, cfg.damping))
        return out
    out["kron"] = whitened_fit(W, n, r, *metric_factors(C, n), damping=cfg.damping)
    if cfg.method == "als" and r * n2 <= cfg.max_dim:
        start = min(("weight", "kron"), key=lambda k: output_error2(W - kron_matrix(*out[k]), C))
        out["als"] = als_fit(W, C, *out[start], sweeps=cfg.sweeps, damping=cfg.damping)
    return out


def fit_weight(p: KronParametrization, factors: list[Tensor], dense: Tensor, bias: Tensor | None,
               view: InputView, fit: list[Moments], held: list[Moments], cfg: CalibrationConfig) -> LayerFit:
    """Fit every chunk of `dense` (the layer's weight before conversion) to its inputs, write the kept factors
    into `factors` ([A, F] or [F]) and the bias correction into `bias`, both in place."""
    As, Fs, deltas, sq, werr2, scores, wscores, hows = [], [], [], [], [], [], [], set()
    for c, w in enumerate(dense.detach().chunk(p.chunks)):
        W = weight_matrix(w, view.transposed)
        src = view.sources[c]
        centred = cfg.method != "weight" and cfg.bias_correction and bias is not None and not view.taps_are_outputs
        C, mean = fit[src].metric(view.kernel, centred, view.taps_are_outputs)
        C, mean = C.to(W.device), mean.to(W.device)
        score = _Scorer(W, held[src], view)
        best = None
        for name, (A, F) in _candidates(W, p, C, cfg).items():
            A = A.reshape(-1, p.n, p.n).double()
            E = W - kron_matrix(A, F.reshape(A.shape[0], W.shape[0] // p.n, -1))
            options = [(name, None)] + ([(f"{name}+bias", mean)] if centred else [])
            for label, shift in options:
                s = score(E, shift)
                if label == "weight":
                    wscores.append(s)
                if best is None or s < best[0]:
                    best = (s, label, A, F, E, shift)
        s, label, A, F, E, shift = best
        A, F = _to_factors(A, F.reshape(A.shape[0], W.shape[0] // p.n, -1), w, p.n, view.transposed)
        As.append(A)
        Fs.append(F)
        deltas.append(E @ shift if shift is not None else None)
        sq.append(float(W.pow(2).sum()))
        werr2.append(float(E.pow(2).sum()))
        scores.append(s)
        hows.add(label)
    with torch.no_grad():
        if p.learned:
            factors[0].copy_(torch.cat(As).to(factors[0].dtype))
        factors[-1].copy_(torch.cat(Fs).to(factors[-1].dtype))
        if bias is not None:
            for delta, b in zip(deltas, bias.chunk(p.chunks)):
                if delta is not None:
                    b.add_(delta.to(b.dtype))
    p.fit_error = math.sqrt(sum(werr2) / sum(sq)) if sum(sq) > 0 else 0.0
    p.clear_cache()
    return LayerFit("/".join(sorted(hows)), rms(scores), rms(wscores), p.fit_error)


def rms(values: list[float]) -> float:
    """Root mean square: how per-chunk and per-weight relative errors are combined into one."""
    return math.sqrt(sum(v * v for v in values) / len(values))
