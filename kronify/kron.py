"""Kronecker-sum weights W = Σ_t A_t ⊗ F_t and the nearest such sum to a given dense weight.

Layout convention (shared by every kronify layer): for A of shape (terms, n, n) and F of shape
(terms, p, q, *kernel), W has shape (n·p, n·q, *kernel) and

    W[a·p + i, b·q + j, ...] = Σ_t A[t, a, b] · F[t, i, j, ...]

i.e. torch.kron(A_t, F_t) on the first two dims, with the kernel dims carried by F.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from kronify.algebra import LEARNED, check_n, resolve_algebra

__all__ = ["check_kron_dims", "kron_weight", "kronecker_fit", "kronecker_projection", "nearest_kronecker", "project_kronecker"]

# A term whose singular value is below this fraction of the largest one counts as "empty":
# its A factor gets a usable scale and its F factor carries the (tiny or zero) value, so the
# term can still learn instead of sitting at A = F = 0, where both gradients vanish.
_EMPTY_TERM_RTOL = 1e-6


def kron_weight(A: Tensor, F: Tensor) -> Tensor:
    """Dense weight Σ_t A_t ⊗ F_t from A (terms, n, n) and F (terms, p, q, *kernel); differentiable in A and F.

    Large weights (≥ 2²⁰ entries) are written straight into the torch.kron layout and differentiated
    by a hand-written backward that reads the weight's gradient where it lies: one |W|-sized buffer
    per call and no permuting copies (`_KronWeight`). Smaller weights, torch.jit.trace, torch.compile,
    torch.func and double backward use a plain composite of torch ops (one matmul and one permuting copy), whose
    lower per-call overhead wins for small weights and which tracers and compilers fuse themselves.
    Under OMP_WAIT_POLICY=passive the smaller CPU weights run that composite, forward and backward, on one
    thread (`_KronWeight` with one_thread=True), see `_ONE_THREAD`.
    """
    if A.dim() != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"A must have shape (terms, n, n), got {tuple(A.shape)}")
    if F.dim() < 3 or F.shape[0] != A.shape[0]:
        raise ValueError(
            f"F must have shape (terms={A.shape[0]}, out/n, in/n, *kernel), got {tuple(F.shape)}"
        )
    return _kron_weight(A, F)


# From this many dense-weight entries on, `kron_weight` takes `_KronWeight` (fewer passes over memory, no
# |W|-sized temporaries); below it the composite, whose backward runs in C++ with less per-call overhead
# than a Python autograd.Function. Forward + backward of one weight on 2 CPU cores (2 threads): the
# Function took 1.1-1.9x the composite's time from 0.15 M to 0.6 M entries, 0.7-1.3x at 1 M, and
# 0.67-0.70x at 2.4 M (benchmarks/layers.py reports both, "composite / Function W build ms").
_FUNCTION_MIN_NUMEL = 1 << 20

# With OMP_WAIT_POLICY=passive (read, as OpenMP reads it, at start-up) idle threads sleep, and every parallel
# region (each matmul, each copy of more than 32 K entries) pays to wake them: 50-150 µs each on 2 CPU cores, more
# than a whole small build. Then CPU weights below `_FUNCTION_MIN_NUMEL` are built, forward and backward, on one
# thread: 2-4x faster than the composite on 2 threads from 1 K to 0.6 M entries (benchmarks/layers.py, "composite /
# Function / one-thread W build ms"). With threads that spin while idle (OpenMP's default) one thread gains nothing
# at 16 K entries and loses 15-35 % from 65 K entries on, so it is off then.
_ONE_THREAD = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"


def _kron_weight(A: Tensor, F: Tensor) -> Tensor:
    """kron_weight without argument checks (the layers' hot path; keeps jit.trace free of warnings)."""
    numel = A.shape[1] * A.shape[2] * (F.numel() // max(A.shape[0], 1))
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _kron_weight_composite(A, F)  # tracers, compilers and torch.func transform the composite's ops
    if numel >= _FUNCTION_MIN_NUMEL:
        return _KronWeight.apply(A, F, False)
    if _ONE_THREAD and F.device.type == "cpu":
        return _KronWeight.apply(A, F, True)
    return _kron_weight_composite(A, F)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside (0.2 µs to set and restore)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _kron_weight_composite(A: Tensor, F: Tensor) -> Tensor:
    """Σ_t A_t ⊗ F_t as one matmul over the terms and one permuting copy (plain autograd, any order)."""
    terms, n = A.shape[0], A.shape[1]
    p, q = F.shape[1], F.shape[2]
    m = A.reshape(terms, n * n).transpose(0, 1) @ F.reshape(terms, -1)  # (n·n, p·q·k)
    w = m.view(n, n, p, q, -1).permute(0, 2, 1, 3, 4)  # (a, i, b, j, k)
    return w.reshape(n * p, n * q, *F.shape[3:])


def _sum_of_products(out: Tensor, products) -> Tensor:
    """out = Σ x·y over the (x, y) pairs of `products` (broadcast to out's shape), written in place:
    one multiply, then multiply-adds, and no temporary of out's size."""
    (x, y), *rest = products
    torch.mul(x, y, out=out)
    for x, y in rest:
        out.addcmul_(x, y)
    return out


def _build_weight(A: Tensor, F: Tensor) -> Tensor:
    """Σ_t A_t ⊗ F_t written into one new tensor: W viewed as (a, i, b, j·k) is Σ_t A[t,a,b]·F[t,i,j·k]."""
    terms, n = A.shape[0], A.shape[1]
    p, q = F.shape[1], F.shape[2]
    Ft = F.reshape(terms, p, 1, -1)  # (t, i, 1, j·k), broadcast over a and b
    At = A.reshape(terms, n, 1, n, 1)
    W = torch.empty(n, p, n, Ft.shape[-1], dtype=torch.promote_types(A.dtype, F.dtype), device=F.device)
    return _sum_of_products(W, zip(At, Ft)).view(n * p, n * q, *F.shape[3:])


class _KronWeight(torch.autograd.Function):
    """W = Σ_t A_t ⊗ F_t with a backward that contracts dL/dW where it lies.

    With G = dL/dW viewed as (a, i, b, j·k) (a view, no copy):
      dF[t] = Σ_{a,b} A[t, a, b] · G[a, :, b]   (n² broadcast multiply-adds into dF)
      dA[t, a, :] = Σ_i G[a, i] @ F[t, i]ᵀ      (one batched matmul over i per row block a)
    so the backward allocates only dF and dA, where the composite's autograd first copies G into
    the permuted (a, b, i, j·k) order. The forward is `_build_weight`.
    With one_thread=True (small weights) forward and backward are instead the composite's ops, run on one thread.
    """

    @staticmethod
    def forward(A: Tensor, F: Tensor, one_thread: bool) -> Tensor:
        if not one_thread:
            return _build_weight(A, F)
        with _one_thread(), torch.autocast(F.device.type, enabled=False):
            return _kron_weight_composite(A, F)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:2])
        ctx.save_for_forward(*inputs[:2])
        ctx.one_thread = inputs[2]

    @staticmethod
    def jvp(ctx, dA: Tensor | None, dF: Tensor | None, _one_thread: None) -> Tensor:
        """Forward-mode AD (torch.autograd.forward_ad; torch.func takes the composite):
        dW = Σ_t dA_t ⊗ F_t + A_t ⊗ dF_t (W is bilinear)."""
        A, F = ctx.saved_tensors
        parts = [_kron_weight_composite(a, f) for a, f in ((dA, F), (A, dF)) if a is not None and f is not None]
        return parts[0] + parts[1] if len(parts) == 2 else parts[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        A, F = ctx.saved_tensors
        need_A, need_F = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite instead
            with torch.enable_grad():
                inputs = [x for x, need in ((A, need_A), (F, need_F)) if need]
                grads = iter(torch.autograd.grad(_kron_weight_composite(A, F), inputs, grad, create_graph=True))
            return (next(grads) if need_A else None), (next(grads) if need_F else None), None
        terms, n, p = A.shape[0], A.shape[1], F.shape[1]
        dA = dF = None
        with torch.autocast(grad.device.type, enabled=False), _one_thread() if ctx.one_thread else nullcontext():
            G = grad.reshape(n, p, n, -1)  # (a, i, b, j·k); a view when grad is contiguous
            if ctx.one_thread:  # the composite's backward: G in (a·b, i·j·k) order (one copy), then two matmuls
                G = G.transpose(1, 2).reshape(n * n, -1)
                if need_A:
                    dA = (F.reshape(terms, -1).to(G.dtype) @ G.T).view(A.shape).to(A.dtype)
                if need_F:
                    dF = (A.reshape(terms, -1).to(G.dtype) @ G).view(F.shape).to(F.dtype)
                return dA, dF, None
            if need_F:
                At = A.to(G.dtype).view(terms, n, n, 1, 1)
                products = ((At[:, a, b], G[a, :, b]) for a, b in itertools.product(range(n), repeat=2))
                dF = torch.empty(terms, p, G.shape[-1], dtype=G.dtype, device=G.device)
                dF = _sum_of_products(dF, products).view(F.shape).to(F.dtype)
            if need_A:
                Fp = F.to(G.dtype).reshape(terms, p, -1).permute(1, 2, 0)  # (i, j·k, t), a strided view
                dA = torch.stack([torch.bmm(G[a], Fp).sum(0) for a in range(n)])  # (a, b, t)
                dA = dA.permute(2, 0, 1).to(A.dtype)
        return dA, dF, None


def check_kron_dims(rows: int, cols: int, n: int, what: str = "W") -> None:
    """Raise a ValueError naming the dims unless both are divisible by n (an integer >= 2)."""
    check_n(n)
    bad = [f"dim {k} = {d}" for k, d in ((0, rows), (1, cols)) if d % n]
    if bad:
        raise ValueError(
            f"{what}: shape ({rows}, {cols}, ...) is not divisible by n={n} ({', '.join(bad)})"
        )


def _rearrange(W: Tensor, n: int) -> Tensor:
    """Van Loan–Pitsianis rearrangement in float64: R[(a,b), (i,j,k)] = W[a·p+i, b·q+j, k] (a full copy;
    the fits below stream over it in blocks instead, see `_blocks`)."""
    p, q = W.shape[0] // n, W.shape[1] // n
    view = W.detach().reshape(n, p, n, q, -1).permute(0, 2, 1, 3, 4)
    R = torch.empty(view.shape, dtype=torch.float64, device=W.device)
    R.copy_(view)  # one pass: permute and upcast together
    return R.view(n * n, -1)


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


def kronecker_fit(W: Tensor, n: int, terms: int) -> tuple[Tensor, Tensor, float, float]:
    """`nearest_kronecker` plus ‖W‖²_F (float64): (A, F, rel_error, squared norm). Two streaming passes over W
    (`_blocks`): the first sums the n²×n² Gram matrix G = R·Rᵀ, the second projects R onto G's eigenvectors and
    writes F block by block in W's dtype; the memory it needs beyond W is F and one block."""
    if W.dim() < 2:
        raise ValueError(f"W must have at least 2 dims (out, in, *kernel), got shape {tuple(W.shape)}")
    check_kron_dims(W.shape[0], W.shape[1], n, "nearest_kronecker: W")
    resolve_algebra(LEARNED, n, terms)  # validates terms in 1..n²
    G = torch.zeros(n * n, n * n, dtype=torch.float64, device=W.device)
    for _, _, R in _blocks(W, n):
        G.addmm_(R, R.T)
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
    """Best Frobenius-norm approximation of W by Σ_{t<terms} A_t ⊗ F_t (Van Loan–Pitsianis).

    W has shape (out, in, *kernel) with out and in divisible by n. W is rearranged into the
    (n², out·in·k/n²) matrix R whose rank-1 terms are exactly the Kronecker terms, and R's truncated
    SVD gives the optimum (Eckart–Young). The SVD is taken in float64 whatever W's dtype, through the
    small n²×n² Gram matrix R·Rᵀ: its eigenvectors are R's left singular vectors u_t, and
    P_t = u_tᵀR = σ_t·v_tᵀ is computed by projection, so the n² terms reproduce W exactly even where
    singular values are tiny. R is never materialized: W is read twice in cache-sized blocks
    (`kronecker_fit`), so the time is linear in W's size and the extra memory is F plus one block.
    The Gram matrix squares R's condition number; it is summed in float64 because the eigenvalues then
    resolve σ_t down to ~1e-8·σ_0 (float32 would stop near 3e-4·σ_0), and exactness does not depend on it.
    A and F come back in W's dtype and device, with √σ_t on each factor (A_t = √σ_t·u_t, F_t = P_t/√σ_t)
    so their norms are balanced.

    Returns (A (terms, n, n), F (terms, out/n, in/n, *kernel), rel_error) where
    rel_error = ‖W − Σ A_t⊗F_t‖_F / ‖W‖_F = sqrt(Σ_{t≥terms} σ_t² / Σ_t σ_t²) (0 for W = 0);
    it is 0 at terms = n². If R has fewer than `terms` non-zero singular values (e.g. a 1×1 conv
    with out/n = in/n = 1), the extra terms are zero: A_t is an orthogonal direction of usable scale
    and F_t = 0, so the product is unchanged and the term can still be trained. Non-finite W raises.
    """
    A, F, rel_error, _ = kronecker_fit(W, n, terms)
    return A, F, rel_error


def kronecker_projection(W: Tensor, A: Tensor) -> tuple[Tensor, float, float]:
    """`project_kronecker` plus ‖W‖²_F (float64): (F, rel_error, squared norm), one streaming pass over W."""
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


def project_kronecker(W: Tensor, A: Tensor) -> tuple[Tensor, float]:
    """Least-squares F for a fixed A: argmin_F ‖W − Σ_t A_t ⊗ F_t‖_F (exact projection, float64, streamed over
    W in blocks like `kronecker_fit`).

    Used for warm starts with a fixed algebra. Returns (F in W's dtype, rel_error) with rel_error the
    relative Frobenius residual ‖W − Σ A_t⊗F_t‖_F / ‖W‖_F (0 for W = 0).
    """
    F, rel_error, _ = kronecker_projection(W, A)
    return F, rel_error
