"""The nearest Kronecker sum Σ_t A_t ⊗ F_t to a dense weight (Van Loan–Pitsianis), in the layout of `kronify.kron`.

W of shape (n·p, n·q, *kernel) is rearranged into the (n², p·q·k) matrix R[(a,b), (i,j,k)] = W[a·p+i, b·q+j, k],
whose rank-1 terms are exactly the Kronecker terms, so R's truncated SVD is the best sum of a given number of
terms (Eckart–Young). R is never built: the fits read W twice in cache-sized blocks, in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kronify.algebra import LEARNED, resolve_algebra
from kronify.kron import check_kron_dims

__all__ = ["gram", "kronecker_fit", "nearest_kronecker", "project_kronecker"]

# A term whose singular value is below this fraction of the largest one counts as "empty":
# its A factor gets a usable scale and its F factor carries the (tiny or zero) value, so the
# term can still learn instead of sitting at A = F = 0, where both gradients vanish.
_EMPTY_TERM_RTOL = 1e-6


# Entries of R per block: 512 KiB of float64, which stays in a core's L2 cache between the copy and the matmuls,
# and stays below glibc's mmap threshold, so the buffers are not page-faulted in anew for every block.
_BLOCK_NUMEL = 1 << 16


def _blocks(W: Tensor, n: int):
    """Yield (rows i0:i1 of each p-block, R's columns for them in float64): R = the Van Loan–Pitsianis
    rearrangement, one cache-sized block at a time, so a fit never holds more than a block of float64 and reads
    W through views (any strides, channels_last too) with one upcasting copy per entry."""
    p, q = W.shape[0] // n, W.shape[1] // n
    view = W.detach().unflatten(1, (n, q)).unflatten(0, (n, p)).movedim(2, 1)  # (a, b, i, j, *kernel)
    rows = max(1, _BLOCK_NUMEL // max(1, n * n * (W.numel() // (W.shape[0] * n))))
    buf = None
    for i0 in range(0, p, rows):
        block = view[:, :, i0:i0 + rows]
        if buf is None or buf.shape != block.shape:
            buf = torch.empty(block.shape, dtype=torch.float64, device=W.device)
        buf.copy_(block)
        yield i0, i0 + block.shape[2], buf.view(n * n, -1)


def gram(W: Tensor, n: int) -> Tensor:
    """G = R·Rᵀ (n² × n², float64) of the Van Loan–Pitsianis rearrangement R of W, summed block by block: its
    eigenvalues are the squared singular values σ_t² of the Kronecker terms, its eigenvectors R's left singular
    vectors."""
    G = torch.zeros(n * n, n * n, dtype=torch.float64, device=W.device)
    for _, _, R in _blocks(W, n):
        G.addmm_(R, R.T)
    return G


def kronecker_fit(W: Tensor, n: int, terms: int) -> tuple[Tensor, Tensor, float, float]:
    """`nearest_kronecker` plus ‖W‖²_F (float64): (A, F, rel_error, squared norm). Two streaming passes over W
    (`_blocks`): the first sums the n²×n² Gram matrix G = R·Rᵀ, the second projects R onto G's eigenvectors and
    writes F block by block in W's dtype; the memory it needs beyond W is F and one block."""
    if W.dim() < 2:
        raise ValueError(f"W must have at least 2 dims (out, in, *kernel), got shape {tuple(W.shape)}")
    check_kron_dims(W.shape[0], W.shape[1], n, "nearest_kronecker: W")
    resolve_algebra(LEARNED, n, terms)  # validates terms in 1..n²
    G = gram(W, n)
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"nearest_kronecker: W of shape {tuple(W.shape)} has non-finite entries (inf or nan)")
    lam, U = torch.linalg.eigh(G)
    lam, U = lam.flip(0).clamp_min(0), U.flip(1)  # σ_t² and u_t by decreasing σ
    # Per-term scale √σ_t from the eigenvalues (accurate to ~1e-16·σ_0² in float64, far below the
    # _EMPTY_TERM_RTOL² = 1e-12 threshold); any positive scale gives the same product A_t ⊗ F_t.
    s = lam[:terms].sqrt()
    s0 = float(s.max())
    alive = s > _EMPTY_TERM_RTOL * s0
    scale = torch.where(alive, s, torch.full_like(s, s0 if s0 > 0 else 1.0)).sqrt()
    inv = torch.where(alive, 1 / scale, torch.zeros_like(scale)).unsqueeze(1)
    p, q = W.shape[0] // n, W.shape[1] // n
    F = torch.empty(terms, p, q, *W.shape[2:], dtype=W.dtype, device=W.device)
    Fv = F.view(terms, p, -1)
    energy = torch.zeros(n * n, dtype=torch.float64, device=W.device)
    Ut = U.T.contiguous()
    P = None
    for i0, i1, R in _blocks(W, n):
        if P is None or P.shape != R.shape:
            P = torch.empty_like(R)
        torch.mm(Ut, R, out=P)  # row t = σ_t·v_tᵀ on these columns
        energy.add_(torch.linalg.vector_norm(P, dim=1).square())  # σ_t², an exact split of ‖W‖²
        Fv[:, i0:i1] = P[:terms].mul_(inv).view(terms, i1 - i0, -1)
    total = float(energy.sum())
    rel_error = math.sqrt(float(energy[terms:].sum()) / total) if total > 0 else 0.0
    A = (U[:, :terms] * scale).T.reshape(terms, n, n)
    return A.to(W.dtype), F, rel_error, total


def nearest_kronecker(W: Tensor, n: int, terms: int) -> tuple[Tensor, Tensor, float]:
    """Best Frobenius-norm approximation of W (out, in, *kernel; out, in divisible by n) by Σ_{t<terms} A_t ⊗ F_t.

    R's SVD is taken in float64 whatever W's dtype, through the n²×n² Gram matrix R·Rᵀ (`gram`): its eigenvectors
    are R's left singular vectors u_t, and P_t = u_tᵀR = σ_t·v_tᵀ is computed by projection, so the n² terms
    reproduce W exactly even where singular values are tiny. Summed in float64, the eigenvalues resolve σ_t down to
    ~1e-8·σ_0 (float32 would stop near 3e-4·σ_0). Time is linear in W's size; the extra memory is F and one block.
    A and F come back in W's dtype and device, balanced: A_t = √σ_t·u_t, F_t = P_t/√σ_t.

    Returns (A (terms, n, n), F (terms, out/n, in/n, *kernel), rel_error), rel_error = ‖W − Σ A_t⊗F_t‖_F / ‖W‖_F
    = sqrt(Σ_{t≥terms} σ_t² / Σ_t σ_t²) (0 for W = 0 and at terms = n²). If R has fewer than `terms` non-zero
    singular values (a 1×1 conv with out/n = in/n = 1), the extra terms get F_t = 0 and an A_t of usable scale,
    so the product is unchanged and they can still be trained. Non-finite W raises.
    """
    A, F, rel_error, _ = kronecker_fit(W, n, terms)
    return A, F, rel_error


def project_kronecker(W: Tensor, A: Tensor) -> tuple[Tensor, float, float]:
    """Least-squares F for a fixed A (warm starts with a fixed algebra): argmin_F ‖W − Σ_t A_t ⊗ F_t‖_F, exact, in
    float64, one streaming pass over W. Returns (F in W's dtype, rel_error = ‖W − Σ A_t⊗F_t‖_F / ‖W‖_F (0 for
    W = 0), ‖W‖²_F)."""
    if A.dim() != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"A must have shape (terms, n, n), got {tuple(A.shape)}")
    terms, n, _ = A.shape
    check_kron_dims(W.shape[0], W.shape[1], n, "project_kronecker: W")
    M = A.detach().to(device=W.device, dtype=torch.float64).reshape(terms, n * n).transpose(0, 1)
    pinv = torch.linalg.pinv(M)
    F = torch.empty(terms, W.shape[0] // n, W.shape[1] // n, *W.shape[2:], dtype=W.dtype, device=W.device)
    Fv = F.view(terms, W.shape[0] // n, -1)
    total = resid = 0.0
    for i0, i1, R in _blocks(W, n):
        Fm = pinv @ R
        total += float(R.square().sum())
        resid += float((R - M @ Fm).square().sum())
        Fv[:, i0:i1] = Fm.view(terms, i1 - i0, -1)
    if not math.isfinite(total):
        raise ValueError(f"project_kronecker: W of shape {tuple(W.shape)} has non-finite entries (inf or nan)")
    rel_error = math.sqrt(resid / total) if total > 0 else 0.0
    return F, rel_error, total
