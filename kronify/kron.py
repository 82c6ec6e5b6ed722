"""Kronecker-sum weights W = Σ_t A_t ⊗ F_t, built differentiably (the nearest such sum to a dense weight: `kronify.nearest`).

Layout convention (shared by every kronify layer): for A of shape (terms, n, n) and F of shape
(terms, p, q, *kernel), W has shape (n·p, n·q, *kernel) and

    W[a·p + i, b·q + j, ...] = Σ_t A[t, a, b] · F[t, i, j, ...]

i.e. torch.kron(A_t, F_t) on the first two dims, with the kernel dims carried by F.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from kronify.algebra import check_n

__all__ = ["check_kron_dims", "kron_weight"]

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
# thread: 1.1-2.5x faster than the composite on 2 threads from 1 K to 0.6 M entries (benchmarks/layers.py,
# "composite / Function / one-thread W build ms"). With threads that spin while idle (OpenMP's default) one thread
# is 8 % slower at 16 K entries and 20-40 % slower from 65 K on, so it is off then.
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
    """Run torch's CPU ops on one thread inside."""
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
