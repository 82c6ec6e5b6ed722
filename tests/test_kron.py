"""Kronecker math (kronify.kron, kronify.nearest) and the fixed algebras (kronify.algebra)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch import nn

import kronify
from kronify import cpu_kernel, kron_weight, nearest_kronecker
from kronify.algebra import ALGEBRAS, algebra_matrices, resolve_algebra
import kronify.kron as kron_module
from kronify.kron import _kron_weight_composite, _KronWeight
from kronify.nearest import project_kronecker

PROPS = settings(max_examples=40, deadline=None)

dims = st.integers(1, 4)
ns = st.sampled_from([2, 3, 4, 5])
kernels = st.lists(st.integers(1, 3), min_size=0, max_size=3)


def kron_reference(A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Σ_t torch.kron(A_t, F_t) on the first two dims, one kernel position at a time."""
    kernel = F.shape[3:]
    flat = F.reshape(*F.shape[:3], -1)
    cols = [
        sum(torch.kron(A[t], flat[t, :, :, k]) for t in range(A.shape[0])) for k in range(flat.shape[-1])
    ]
    return torch.stack(cols, dim=-1).reshape(A.shape[1] * F.shape[1], A.shape[2] * F.shape[2], *kernel)


def rearranged_svdvals(W: torch.Tensor, n: int) -> torch.Tensor:
    """Singular values of the Van Loan–Pitsianis matrix, built block by block (independent of kron.py)."""
    p, q = W.shape[0] // n, W.shape[1] // n
    rows = [W[a * p : (a + 1) * p, b * q : (b + 1) * q].reshape(-1) for a in range(n) for b in range(n)]
    return torch.linalg.svdvals(torch.stack(rows).double())


@PROPS
@given(n=ns, p=dims, q=dims, kernel=kernels, data=st.data())
def test_kron_weight_equals_sum_of_torch_kron(n, p, q, kernel, data):
    terms = data.draw(st.integers(1, n * n))
    A = torch.randn(terms, n, n, dtype=torch.float64)
    F = torch.randn(terms, p, q, *kernel, dtype=torch.float64)
    W = kron_weight(A, F)
    assert W.shape == (n * p, n * q, *kernel)
    torch.testing.assert_close(W, kron_reference(A, F), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [kron_weight, _KronWeight.apply], ids=["kron_weight", "_KronWeight"])
def test_kron_weight_is_differentiable_twice(fn):
    A = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    F = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (A, F))
    assert torch.autograd.gradgradcheck(fn, (A, F))


@pytest.mark.parametrize("rows, path", [(1024, "_KronWeightBackward"), (64, "UnsafeViewBackward")])
def test_kron_weight_takes_the_function_for_large_weights_only(monkeypatch, rows, path):
    monkeypatch.setitem(cpu_kernel._loaded, "ops", None)  # the torch-ops routing, as without a C++ compiler
    A = torch.randn(2, 2, 2, requires_grad=True)
    F = torch.randn(2, rows // 2, rows // 2, requires_grad=True)  # W: rows × rows
    W = kron_weight(A, F)
    assert type(W.grad_fn).__name__.startswith(path)
    torch.testing.assert_close(W, _kron_weight_composite(A, F))


@PROPS
@given(n=ns, p=dims, q=dims, kernel=kernels, needs=st.sampled_from(["A", "F", "both"]),
       transposed_grad=st.booleans(), data=st.data())
def test_kron_weight_function_backward_equals_autograd_of_torch_kron(n, p, q, kernel, needs, transposed_grad, data):
    """The hand-written backward against autograd through the torch.kron reference, for either factor
    alone or both, and for a non-contiguous incoming gradient."""
    terms = data.draw(st.integers(1, n * n))
    A = torch.randn(terms, n, n, dtype=torch.float64, requires_grad=needs in ("A", "both"))
    F = torch.randn(terms, p, q, *kernel, dtype=torch.float64, requires_grad=needs in ("F", "both"))
    g = torch.randn(n * q, n * p, *kernel, dtype=torch.float64)
    g = g.transpose(0, 1) if transposed_grad else g.reshape(n * p, n * q, *kernel)
    inputs = [x for x in (A, F) if x.requires_grad]
    got = torch.autograd.grad(_KronWeight.apply(A, F), inputs, g)
    want = torch.autograd.grad(kron_reference(A, F), inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("route", ["composite", "function"])
def test_kron_weight_under_vmap_and_per_sample_gradients(monkeypatch, route):
    """torch.func transforms take the composite whatever the size (the Function runs outside them): vmap, and
    per-sample gradients and jacrev equal to plain backward passes, which take the composite or the Function."""
    monkeypatch.setattr(kron_module, "_FUNCTION_MIN_NUMEL", 0 if route == "function" else 1 << 20)
    monkeypatch.setitem(cpu_kernel._loaded, "ops", None)  # the torch-ops routing, as without a C++ compiler
    A, Fs = torch.randn(2, 2, 2), torch.randn(3, 2, 4, 3, 3)  # 3 samples of F (terms 2, 4×3, kernel 3)
    batched = torch.func.vmap(kron_weight, in_dims=(None, 0))(A, Fs)
    torch.testing.assert_close(batched, torch.stack([kron_reference(A, F) for F in Fs]))
    lin = nn.Linear(4, 6)
    kronify.convert(nn.Sequential(lin))
    want = "UnsafeViewBackward" if route == "composite" else "_KronWeightBackward"
    assert type(lin.weight.grad_fn).__name__.startswith(want)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    x = torch.randn(5, 4)

    def loss(p, xi):
        return torch.func.functional_call(lin, p, (xi[None],)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(lin, p, (x,)))(params)
    for i in (0, 4):
        lin.zero_grad()
        lin(x[i : i + 1]).pow(2).sum().backward()
        factors = lin.parametrizations.weight
        torch.testing.assert_close(per_sample["parametrizations.weight.original1"][i], factors.original1.grad)
        torch.testing.assert_close(per_sample["parametrizations.weight.original0"][i], factors.original0.grad)
        lin.zero_grad()
        lin(x)[i, 2].backward()
        torch.testing.assert_close(jac["parametrizations.weight.original0"][i, 2], factors.original0.grad)


def test_kron_weight_function_forward_mode_ad():
    """torch.autograd.forward_ad through the Function (its jvp): dW = Σ dA_t ⊗ F_t + A_t ⊗ dF_t."""
    import torch.autograd.forward_ad as fwAD

    A, F = torch.randn(3, 2, 2, dtype=torch.float64), torch.randn(3, 2, 4, 3, dtype=torch.float64)
    dA, dF = torch.randn_like(A), torch.randn_like(F)
    with fwAD.dual_level():
        W = _KronWeight.apply(fwAD.make_dual(A, dA), fwAD.make_dual(F, dF))
        primal, tangent = fwAD.unpack_dual(W)
    torch.testing.assert_close(primal, kron_reference(A, F))
    torch.testing.assert_close(tangent, kron_reference(dA, F) + kron_reference(A, dF))


def test_kron_weight_under_cpu_autocast_gives_float32_gradients():
    A = torch.randn(2, 2, 2, requires_grad=True)
    F = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    x = torch.randn(1, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = _KronWeight.apply(A, F)
        assert W.dtype == torch.float32
        y = torch.nn.functional.conv2d(x, W)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == F.grad.dtype == torch.float32
    assert torch.isfinite(F.grad).all() and F.grad.abs().sum() > 0


def test_kron_weight_bad_shapes():
    with pytest.raises(ValueError, match="A must have shape"):
        kron_weight(torch.randn(2, 2, 3), torch.randn(2, 1, 1))
    with pytest.raises(ValueError, match="F must have shape"):
        kron_weight(torch.randn(2, 2, 2), torch.randn(3, 1, 1))


@PROPS
@given(n=ns, p=dims, q=dims, kernel=kernels, data=st.data())
def test_nearest_kronecker_error_is_discarded_energy(n, p, q, kernel, data):
    terms = data.draw(st.integers(1, n * n))
    W = torch.randn(n * p, n * q, *kernel, dtype=torch.float64)
    A, F, err = nearest_kronecker(W, n, terms)
    assert A.shape == (terms, n, n) and F.shape == (terms, p, q, *kernel)
    s = rearranged_svdvals(W, n)
    discarded = math.sqrt(float((s[terms:] ** 2).sum() / (s**2).sum()))
    assert err == pytest.approx(discarded, rel=1e-9, abs=1e-12)
    actual = float((W - kron_weight(A, F)).norm() / W.norm())
    assert actual == pytest.approx(discarded, rel=1e-9, abs=1e-12)
    if terms == n * n:
        assert err == 0.0
        torch.testing.assert_close(kron_weight(A, F), W, rtol=1e-10, atol=1e-12)


def test_nearest_kronecker_recovers_a_kronecker_sum_and_balances_factors():
    A0, F0 = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 4, 5, 3, dtype=torch.float64)
    W = kron_weight(A0, F0)
    A, F, err = nearest_kronecker(W, 3, 2)
    assert err < 1e-10
    torch.testing.assert_close(kron_weight(A, F), W)
    torch.testing.assert_close(A.flatten(1).norm(dim=1), F.flatten(1).norm(dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nearest_kronecker_computes_in_float64(dtype):
    W = torch.randn(8, 6, 3).to(dtype)
    A, F, err = nearest_kronecker(W, 2, 2)
    assert A.dtype == dtype and F.dtype == dtype
    _, _, err64 = nearest_kronecker(W.double(), 2, 2)
    assert err == err64  # same float64 computation on the same values
    _, _, err_full = nearest_kronecker(W, 2, 4)
    assert err_full == 0.0


def test_nearest_kronecker_rank_deficient_pads_with_zero_terms():
    # 1×1 conv with out/n = in/n = 1: the rearranged matrix is 4×1, rank 1 < terms = 4.
    W = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    A, F, err = nearest_kronecker(W, 2, 4)
    assert err == 0.0
    torch.testing.assert_close(kron_weight(A, F), W)
    f_norms = F.flatten(1).norm(dim=1)
    assert (f_norms[1:] == 0).all() and f_norms[0] > 0
    assert (A.flatten(1).norm(dim=1) > 0).all()  # extra terms can still learn: dW/dF_t = A_t ≠ 0
    # A of the extra terms spans the directions the first term misses
    assert torch.linalg.matrix_rank(A.reshape(4, 4)) == 4


def test_nearest_kronecker_zero_weight():
    A, F, err = nearest_kronecker(torch.zeros(4, 4), 2, 3)
    assert err == 0.0 and (kron_weight(A, F) == 0).all() and (A.flatten(1).norm(dim=1) > 0).all()


def test_nearest_kronecker_bad_inputs():
    W = torch.randn(6, 4)
    for terms in (0, 5, 2.0):
        with pytest.raises(ValueError, match="terms must be an integer in 1..n²=4"):
            nearest_kronecker(W, 2, terms)
    with pytest.raises(ValueError, match=r"not divisible by n=4 \(dim 0 = 6\)"):
        nearest_kronecker(W, 4, 1)
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        nearest_kronecker(W, 1, 1)
    with pytest.raises(ValueError, match="at least 2 dims"):
        nearest_kronecker(torch.randn(4), 2, 1)


def test_project_kronecker_is_least_squares_for_fixed_A():
    A = algebra_matrices("quaternion", dtype=torch.float64)
    F0 = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    F, err, _ = project_kronecker(kron_weight(A, F0), A)
    assert err < 1e-12
    torch.testing.assert_close(F, F0)
    W = torch.randn(12, 8, 3, dtype=torch.float64)
    F, err, sq_norm = project_kronecker(W, A)
    assert sq_norm == pytest.approx(float(W.square().sum()), rel=1e-12)
    resid = W - kron_weight(A, F)
    assert err == pytest.approx(float(resid.norm() / W.norm()), rel=1e-10)
    # optimality: the residual is orthogonal to every A_t ⊗ G
    G = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((resid * kron_weight(A, G)).sum(), G)
    assert g.abs().max() < 1e-10


# ---- algebras -----------------------------------------------------------------------------------


def test_complex_algebra_is_complex_matrix_product():
    layer = nn.Linear(6, 4, bias=False, dtype=torch.float64)
    kronify.convert(nn.Sequential(layer), algebra="complex")
    F = layer.parametrizations.weight.original.detach().view(2, 2, 3)  # (terms, out/n, in/n)
    x_re, x_im = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    w = torch.complex(F[0], F[1])  # F_0 real part, F_1 imaginary part
    y = torch.complex(x_re, x_im) @ w.T
    out = layer(torch.cat([x_re, x_im], dim=1))
    torch.testing.assert_close(out, torch.cat([y.real, y.imag], dim=1))


def hamilton(q1, q2):
    """Hamilton product of quaternions given as (r, i, j, k) tuples; products are matrix products."""
    a1, b1, c1, d1 = q1
    a2, b2, c2, d2 = q2
    return (
        a1(a2) - b1(b2) - c1(c2) - d1(d2),
        a1(b2) + b1(a2) + c1(d2) - d1(c2),
        a1(c2) - b1(d2) + c1(a2) + d1(b2),
        a1(d2) + b1(c2) - c1(b2) + d1(a2),
    )


def test_quaternion_algebra_is_hamilton_product():
    layer = nn.Linear(8, 12, bias=False, dtype=torch.float64)
    kronify.convert(nn.Sequential(layer), n=4, algebra="quaternion")
    F = layer.parametrizations.weight.original.detach().view(4, 3, 2)
    xs = [torch.randn(5, 2, dtype=torch.float64) for _ in range(4)]
    weight_parts = [(lambda x, f=f: x @ f.T) for f in F]  # F_t acting on a block
    y = hamilton(weight_parts, xs)
    torch.testing.assert_close(layer(torch.cat(xs, dim=1)), torch.cat(y, dim=1))


@pytest.mark.parametrize("name", sorted(ALGEBRAS))
def test_algebra_tables_are_signed_permutations(name):
    A = algebra_matrices(name)
    n = ALGEBRAS[name]
    assert A.shape == (n, n, n)
    assert (A.abs().sum(dim=0) == 1).all()  # every block gets exactly one ±F_t
    torch.testing.assert_close(A[0], torch.eye(n))


def test_algebra_validation():
    assert resolve_algebra("learned", 3, None) == 3
    assert resolve_algebra("quaternion", 4, None) == 4
    with pytest.raises(ValueError, match="algebra 'complex' requires n=2, got n=4"):
        resolve_algebra("complex", 4, None)
    with pytest.raises(ValueError, match="algebra 'quaternion' has exactly 4 terms, got terms=2"):
        resolve_algebra("quaternion", 4, 2)
    with pytest.raises(ValueError, match="unknown algebra 'octonion'"):
        resolve_algebra("octonion", 8, None)
    with pytest.raises(ValueError, match="unknown algebra"):
        algebra_matrices("learned")
