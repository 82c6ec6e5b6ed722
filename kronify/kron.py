"""Kronecker-sum weights W = Σ_t A_t ⊗ F_t, built differentiably (the nearest such sum to a weight: `kronify.nearest`).

Layout convention (shared by every kronify layer): for A of shape (terms, n, n) and F of shape
(terms, p, q, *kernel), W has shape (n·p, n·q, *kernel) and

    W[a·p + i, b·q + j, ...] = Σ_t A[t, a, b] · F[t, i, j, ...]

i.e. torch.kron(A_t, F_t) on the first two dims, with the kernel dims carried by F.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

import kronify.cpu_kernel as cpu_kernel
from kronify.algebra import check_n
from kronify.weight_memory import WeightMemory

__all__ = ["check_kron_dims", "kron_weight"]


def kron_weight(A: Tensor, F: Tensor) -> Tensor:
    """Dense weight Σ_t A_t ⊗ F_t from A (terms, n, n) and F (terms, p, q, *kernel); differentiable in A and F.

    A CPU training build (float32/64, a factor requiring grad, ≥ 2¹⁷ entries) runs kronify's fused kernel
    (`kronify.cpu_kernel`): one pass to write W, one to read its gradient. Otherwise large weights (≥ 2¹⁹
    entries) are written straight into the torch.kron layout and differentiated by a hand-written backward that
    reads the weight's gradient where it lies: one |W|-sized buffer per call and no permuting copies
    (`_KronWeight`). Smaller weights, torch.jit.trace, torch.compile, torch.func and double backward use a plain
    composite of torch ops (one matmul and one permuting copy), whose lower per-call overhead wins for small
    weights and which tracers and compilers fuse themselves.
    """
    if A.dim() != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"A must have shape (terms, n, n), got {tuple(A.shape)}")
    if F.dim() < 3 or F.shape[0] != A.shape[0]:
        raise ValueError(
            f"F must have shape (terms={A.shape[0]}, out/n, in/n, *kernel), got {tuple(F.shape)}"
        )
    return _kron_weight(A, F)


# Without the CPU kernel, from this many dense-weight entries on, `kron_weight` takes `_KronWeight` (fewer passes
# over memory); below it the composite (its backward runs in C++, with less per-call overhead). Forward + backward
# on 2 CPU cores
# (benchmarks/layers.py, "composite / Function W build ms", four runs): at 0.15 M and 0.26 M entries the Function
# took 1.05-1.8x the composite's time, at 0.59 M 0.80-0.96x and at 2.4 M 0.66-0.76x; a conv 256 (0.59 M) train step
# was 6.6 % (batch 1) and 2.3 % (batch 8) faster with it (A/B of both thresholds, interleaved in one process).
_FUNCTION_MIN_NUMEL = 1 << 19
# From this many entries on, a CPU training build takes the fused kernel (`kronify.cpu_kernel`). Below it the
# kernel builds faster alone under OMP_WAIT_POLICY=PASSIVE (0.3-0.6x the composite's time) but not under the default
# policy (1.07-1.12x from 1 k to 37 k entries), and in a layer's step it was slower up to 65 k entries (linear 64:
# 1.143 against 1.084 of dense, 301 interleaved steps): with no parallel op in the build, torch's OpenMP threads
# fall asleep and the next matmul waits for them. From 147 k entries on the step was as fast or faster
# (benchmarks/results/layers.md, "train ratio, torch ops").
_KERNEL_MIN_NUMEL = 1 << 17
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _kron_weight(A: Tensor, F: Tensor, memory: WeightMemory | None = None) -> Tensor:
    """kron_weight without argument checks (the layers' hot path; keeps jit.trace free of warnings); a large
    weight is built in `memory` when nothing else holds it any more."""
    numel = A.shape[1] * A.shape[2] * (F.numel() // max(A.shape[0], 1))
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _kron_weight_composite(A, F)  # tracers, compilers and torch.func transform the composite's ops
    ops = _training_cpu_ops(A, F) if numel >= _KERNEL_MIN_NUMEL else None
    if ops is not None or numel >= _FUNCTION_MIN_NUMEL:
        return _KronWeight.apply(A, F, memory, ops)
    return _kron_weight_composite(A, F)


def _training_cpu_ops(A: Tensor, F: Tensor):
    """The fused CPU kernel when it serves this build: CPU float32/64 factors, one requiring grad, grad mode on
    (a training step; inference and merge build once and never compile it). None otherwise or when unavailable."""
    if (F.device.type != "cpu" or F.dtype not in _KERNEL_DTYPES or A.dtype != F.dtype
            or not torch.is_grad_enabled() or not (A.requires_grad or F.requires_grad)):
        return None
    return cpu_kernel.ops()


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


def _build_weight(A: Tensor, F: Tensor, memory: WeightMemory | None = None) -> Tensor:
    """Σ_t A_t ⊗ F_t written into one tensor (new, or `memory`'s): W viewed as (a, i, b, j·k) is
    Σ_t A[t,a,b]·F[t,i,j·k]."""
    terms, n = A.shape[0], A.shape[1]
    p, q = F.shape[1], F.shape[2]
    Ft = F.reshape(terms, p, 1, -1)  # (t, i, 1, j·k), broadcast over a and b
    At = A.reshape(terms, n, 1, n, 1)
    shape, dtype = (n, p, n, Ft.shape[-1]), torch.promote_types(A.dtype, F.dtype)
    W = torch.empty(shape, dtype=dtype, device=F.device) if memory is None else memory.empty(shape, dtype, F.device)
    return _sum_of_products(W, zip(At, Ft)).view(n * p, n * q, *F.shape[3:])


class _KronWeight(torch.autograd.Function):
    """W = Σ_t A_t ⊗ F_t with a backward that contracts dL/dW where it lies.

    With G = dL/dW viewed as (a, i, b, j·k) (a view, no copy):
      dF[t] = Σ_{a,b} A[t, a, b] · G[a, :, b]   (n² broadcast multiply-adds into dF)
      dA[t, a, :] = Σ_i G[a, i] @ F[t, i]ᵀ      (one batched matmul over i per row block a)
    so the backward allocates only dF and dA, where the composite's autograd first copies G into
    the permuted (a, b, i, j·k) order. The forward is `_build_weight`. With `ops` (the fused CPU kernel) both
    directions are one pass over W or G each.
    """

    @staticmethod
    def forward(A: Tensor, F: Tensor, memory: WeightMemory | None = None, ops=None) -> Tensor:
        if ops is None:
            return _build_weight(A, F, memory)
        terms, n, p = A.shape[0], A.shape[1], F.shape[1]
        F3 = F.reshape(terms, p, -1).contiguous()
        shape = (n, p, n, F3.shape[-1])
        out = None if memory is None else memory.empty(shape, F.dtype, F.device)
        return ops.kron_forward(A.contiguous(), F3, out).view(n * p, n * F.shape[2], *F.shape[3:])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:2])
        ctx.save_for_forward(*inputs[:2])
        ctx.ops = inputs[3] if len(inputs) > 3 else None

    @staticmethod
    def jvp(ctx, dA: Tensor | None, dF: Tensor | None, _memory=None, _ops=None) -> Tensor:
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
            return (next(grads) if need_A else None), (next(grads) if need_F else None), None, None
        terms, n, p = A.shape[0], A.shape[1], F.shape[1]
        if ctx.ops is not None:
            G = grad.to(F.dtype).contiguous().view(n, p, n, -1)
            dA, dF = ctx.ops.kron_backward(G, A.contiguous(), F.reshape(terms, p, -1).contiguous(), need_A, need_F)
            return (dA if need_A else None), (dF.view(F.shape) if need_F else None), None, None
        dA = dF = None
        with torch.autocast(grad.device.type, enabled=False):
            G = grad.reshape(n, p, n, -1)  # (a, i, b, j·k); a view when grad is contiguous
            if need_F:
                At = A.to(G.dtype).view(terms, n, n, 1, 1)
                products = ((At[:, a, b], G[a, :, b]) for a, b in itertools.product(range(n), repeat=2))
                dF = torch.empty(terms, p, G.shape[-1], dtype=G.dtype, device=G.device)
                dF = _sum_of_products(dF, products).view(F.shape).to(F.dtype)
            if need_A:
                Fp = F.to(G.dtype).reshape(terms, p, -1).permute(1, 2, 0)  # (i, j·k, t), a strided view
                dA = torch.stack([torch.bmm(G[a], Fp).sum(0) for a in range(n)])  # (a, b, t)
                dA = dA.permute(2, 0, 1).to(A.dtype)
        return dA, dF, None, None


def check_kron_dims(rows: int, cols: int, n: int, what: str = "W") -> None:
    """Raise a ValueError naming the dims unless both are divisible by n (an integer >= 2)."""
    check_n(n)
    bad = [f"dim {k} = {d}" for k, d in ((0, rows), (1, cols)) if d % n]
    if bad:
        raise ValueError(f"{what}: shape ({rows}, {cols}, ...) is not divisible by n={n} ({', '.join(bad)})")
