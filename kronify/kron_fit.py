"""Kronecker sums fitted in the metric of a layer's inputs: min ‖(W − Σ_t A_t ⊗ F_t) X‖_F.

Everything here works on a weight as a matrix W (m, d) = (n·p, n·n2) whose rows split as (a, i) and whose
columns split as (b, j): W[a·p + i, b·n2 + j] = Σ_t A_t[a, b] F_t[i, j]. (A conv weight (out, in, *kernel)
is this matrix with j running over (in/n, kernel), which is exactly the im2col order.) C (d, d) is the second
moment of the inputs, Σ x xᵀ, so the output error of Ŵ is tr((W − Ŵ) C (W − Ŵ)ᵀ).

Two fits:
- `whitened_fit`: exact when C = C1 ⊗ C2 (then (A ⊗ F)(L1 ⊗ L2) = (A L1) ⊗ (F L2), and the problem is the
  plain nearest Kronecker sum of W (L1 ⊗ L2)). For a general C it uses C's two partial traces, which are
  PSD by construction.
- `als_fit`: alternating least squares on the full C. Each half-step solves its normal equations exactly,
  so the error never rises; it starts from the better of the weight-only and whitened fits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kronify.nearest import nearest_kronecker

__all__ = ["als_fit", "damped_cholesky", "f_step", "kron_matrix", "metric_factors", "output_error2", "weight_matrix",
           "whitened_fit"]


def kron_matrix(A: Tensor, F: Tensor) -> Tensor:
    """Σ_t A_t ⊗ F_t for A (r, n, n) and F (r, p, n2), as an (n·p, n·n2) matrix."""
    n, p, n2 = A.shape[1], F.shape[1], F.shape[2]
    return torch.einsum("tab,tij->aibj", A, F).reshape(n * p, n * n2)


def output_error2(E: Tensor, C: Tensor) -> float:
    """tr(E C Eᵀ): the summed squared output error of a weight error E on inputs with second moment C."""
    return float(((E @ C) * E).sum())


def _damped(C: Tensor, damping: float) -> Tensor:
    d = C.shape[0]
    scale = float(torch.diagonal(C).mean()) if d else 0.0
    return C + (damping * scale if scale > 0 else 1e-12) * torch.eye(d, dtype=C.dtype, device=C.device)


def weight_matrix(w: Tensor, transposed: bool) -> Tensor:
    """A weight as the float64 matrix W2 (out, in·kernel) that multiplies the layer's input rows; `transposed`:
    the weight is stored (in, out, ...)."""
    return (w.transpose(0, 1) if transposed else w).reshape((w.shape[1] if transposed else w.shape[0]), -1).double()


def damped_cholesky(C: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of C + δ·mean(diag)·I, raising δ ×10 until it succeeds (as SVD-LLM does)."""
    for k in range(12):
        L, info = torch.linalg.cholesky_ex(_damped(C, max(damping, 1e-12) * 10 ** k))
        if int(info) == 0:
            return L
    raise RuntimeError("the input second moment is not positive definite even after damping")


def metric_factors(C: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The partial traces C1 (n, n) and C2 (n2, n2) of C in the (b, j) column split: both PSD, and
    C1 ⊗ C2 ∝ C whenever C is itself a Kronecker product."""
    d = C.shape[0]
    C4 = C.reshape(n, d // n, n, d // n)
    return torch.einsum("bjcj->bc", C4), torch.einsum("bjbk->jk", C4)


def whitened_fit(W: Tensor, n: int, terms: int, C1: Tensor, C2: Tensor,
                 damping: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Nearest Kronecker sum in the metric C1 ⊗ C2: VLP on W (L1 ⊗ L2), then un-whiten each factor."""
    m, d = W.shape
    L1, L2 = damped_cholesky(C1, damping), damped_cholesky(C2, damping)
    Wl = W.reshape(m, n, d // n)
    Wl = torch.einsum("mbj,bc->mcj", Wl, L1)
    Wl = torch.einsum("mcj,jk->mck", Wl, L2).reshape(m, d)
    A, F, _ = nearest_kronecker(Wl, n, terms)
    # A L1 = A'  =>  A = A' L1⁻¹ (row-wise solve); likewise for F
    A = torch.linalg.solve_triangular(L1, A, upper=False, left=False)
    F = torch.linalg.solve_triangular(L2, F.reshape(terms, m // n, d // n), upper=False, left=False)
    return A, F


def _solve_psd(H: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """H⁻¹ rhs for a PSD H, with a little ridge for the directions the inputs never excite."""
    L = damped_cholesky(H, damping)
    return torch.cholesky_solve(rhs, L)


def f_step(C4: Tensor, P: Tensor, A: Tensor, damping: float = 1e-6) -> Tensor:
    """The best F (r, p, n2) for fixed A: [F_1 … F_r] H = D (see `als_fit`); C4 = C as (n, n2, n, n2) and
    P = W C as (n, p, n, n2). With a fixed algebra (A given) this one solve is the whole calibrated fit."""
    r, n2, p = A.shape[0], C4.shape[1], P.shape[1]
    M = torch.einsum("tab,lac->tlbc", A, A)
    H = torch.einsum("tlbc,bjck->tjlk", M, C4).reshape(r * n2, r * n2)
    D = torch.einsum("lac,aick->ilk", A, P).reshape(p, r * n2)
    return _solve_psd(H, D.T, damping).T.reshape(p, r, n2).permute(1, 0, 2).contiguous()


def als_fit(W: Tensor, C: Tensor, A: Tensor, F: Tensor, sweeps: int = 8, damping: float = 1e-6,
            tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Alternating least squares for min tr((W − Σ A_t⊗F_t) C (·)ᵀ) from the start (A, F).

    F-step: [F_1 … F_r] H = D with H_{(t,j),(l,k)} = Σ_{b,c} (A_tᵀA_l)[b,c] C4[b,j,c,k] and
    D_{i,(l,k)} = Σ_{a,c} A_l[a,c] P[a,i,c,k]; A-step: for each row block a, g_a G = B_a with
    G_{(t,b),(l,c)} = Σ_{i,j,k} F_t[i,j] C4[b,j,c,k] F_l[i,k] and B_{a,(l,c)} = Σ_{i,k} P[a,i,c,k] F_l[i,k],
    where P = W C. Stops after `sweeps` or when a sweep lowers the error by less than `tol` (relative).
    """
    r, n = A.shape[0], A.shape[1]
    p, n2 = F.shape[1], F.shape[2]
    C4 = C.reshape(n, n2, n, n2)
    P = (W @ C).reshape(n, p, n, n2)
    Cn = C.reshape(n, n2, n * n2)
    last = output_error2(W - kron_matrix(A, F), C)
    for _ in range(sweeps):
        A_prev, F_prev = A, F
        F = f_step(C4, P, A, damping)
        Fs = F.reshape(r * p, n2)
        Z = torch.einsum("sj,bjx->bsx", Fs, Cn).reshape(n, r, p, n, n2)
        G = torch.einsum("btick,lik->tblc", Z, F).reshape(r * n, r * n)
        B = torch.einsum("aick,lik->alc", P, F).reshape(n, r * n)
        A = _solve_psd(G, B.T, damping).T.reshape(n, r, n).permute(1, 0, 2).contiguous()

        err = output_error2(W - kron_matrix(A, F), C)
        if err > last:  # only the damping can make a sweep worse: keep the previous factors
            return A_prev, F_prev
        if last - err <= tol * max(last, 1e-300):
            break
        last = err
    return A, F
