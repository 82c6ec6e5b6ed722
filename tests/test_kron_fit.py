"""kronify.kron_fit: Kronecker sums fitted in the metric of a layer's inputs, min tr((W − Σ A_t⊗F_t) C (·)ᵀ).

The references are computed independently: the optimum for a Kronecker metric C1 ⊗ C2 is the tail of the
Van Loan–Pitsianis spectrum of W (L1 ⊗ L2); the least-squares F for a fixed A comes from a dense lstsq on the
vectorised problem; kron_matrix is compared with torch.kron.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kronify.nearest import nearest_kronecker
from kronify.kron_fit import als_fit, f_step, kron_matrix, metric_factors, output_error2, whitened_fit

PROPS = settings(max_examples=30, deadline=None)
D = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_pd(d: int, g: torch.Generator, spread: float = 1.0) -> torch.Tensor:
    """A random positive definite (d, d) matrix with eigenvalues spread over about 10**±spread."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=D, generator=g))
    eig = 10 ** (spread * (2 * torch.rand(d, dtype=D, generator=g) - 1))
    return (Q * eig) @ Q.T


def rand_psd(d: int, rank: int, g: torch.Generator) -> torch.Tensor:
    """A random PSD (d, d) matrix of the given rank (possibly singular)."""
    X = torch.randn(rank, d, dtype=D, generator=g)
    return X.T @ X


def err2(W, A, F, C) -> float:
    return output_error2(W - kron_matrix(A, F), C)


def optimum(W: torch.Tensor, n: int, terms: int, C1: torch.Tensor, C2: torch.Tensor) -> float:
    """min over `terms`-term Kronecker sums of ‖(W − Ŵ)(L1 ⊗ L2)‖²: the VLP spectrum tail of W(L1⊗L2)."""
    L = torch.kron(torch.linalg.cholesky(C1), torch.linalg.cholesky(C2))
    WL = W @ L
    _, _, rel = nearest_kronecker(WL, n, terms)
    return rel ** 2 * float(WL.pow(2).sum())


shapes = dict(n=st.sampled_from([2, 3]), p=st.integers(1, 4), n2=st.integers(1, 4), seed=st.integers(0, 2 ** 16))


# ---- kron_matrix, output_error2, metric_factors ---------------------------------------------------------
@PROPS
@given(**shapes, terms=st.integers(1, 9))
def test_kron_matrix_is_the_sum_of_torch_krons(n, p, n2, seed, terms):
    g = gen(seed)
    A, F = torch.randn(terms, n, n, dtype=D, generator=g), torch.randn(terms, p, n2, dtype=D, generator=g)
    K = kron_matrix(A, F)
    assert K.shape == (n * p, n * n2)
    torch.testing.assert_close(K, sum(torch.kron(A[t], F[t]) for t in range(terms)), rtol=1e-12, atol=1e-12)


@PROPS
@given(m=st.integers(1, 6), d=st.integers(1, 8), N=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_output_error2_is_the_summed_squared_output_error(m, d, N, seed):
    g = gen(seed)
    E, X = torch.randn(m, d, dtype=D, generator=g), torch.randn(N, d, dtype=D, generator=g)
    assert output_error2(E, X.T @ X) == pytest.approx(float((X @ E.T).pow(2).sum()), rel=1e-10, abs=1e-10)


@PROPS
@given(**shapes, r1=st.integers(1, 3), r2=st.integers(1, 4))
def test_metric_factors_of_a_kronecker_metric_are_proportional_to_its_factors(n, p, n2, seed, r1, r2):
    g = gen(seed)
    C1, C2 = rand_psd(n, min(r1, n), g), rand_psd(n2, min(r2, n2), g)  # singular ones included
    M1, M2 = metric_factors(torch.kron(C1, C2), n)
    assert M1.shape == (n, n) and M2.shape == (n2, n2)
    torch.testing.assert_close(M1, torch.trace(C2) * C1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M2, torch.trace(C1) * C2, rtol=1e-10, atol=1e-10)


@PROPS
@given(**shapes, N=st.integers(1, 12))
def test_metric_factors_are_psd_for_any_second_moment(n, p, n2, seed, N):
    g = gen(seed)
    X = torch.randn(N, n * n2, dtype=D, generator=g) * torch.rand(n * n2, dtype=D, generator=g) * 10
    C = X.T @ X
    for M in metric_factors(C, n):
        torch.testing.assert_close(M, M.T, rtol=0, atol=1e-10)
        assert float(torch.linalg.eigvalsh(M).min()) >= -1e-9 * float(torch.diagonal(C).sum())
    # the partial traces keep the total energy: tr(C1) = tr(C2) = tr(C)
    M1, M2 = metric_factors(C, n)
    assert float(torch.trace(M1)) == pytest.approx(float(torch.trace(C)), rel=1e-10)
    assert float(torch.trace(M2)) == pytest.approx(float(torch.trace(C)), rel=1e-10)


# ---- whitened_fit ---------------------------------------------------------------------------------------
@PROPS
@given(**shapes, terms=st.integers(1, 9), spread=st.sampled_from([0.0, 1.0, 2.0]))
def test_whitened_fit_is_exact_for_a_kronecker_metric(n, p, n2, seed, terms, spread):
    terms = min(terms, n * n)
    g = gen(seed)
    W = torch.randn(n * p, n * n2, dtype=D, generator=g)
    C1, C2 = rand_pd(n, g, spread), rand_pd(n2, g, spread)
    C = torch.kron(C1, C2)
    A, F = whitened_fit(W, n, terms, C1, C2, damping=1e-12)
    assert A.shape == (terms, n, n) and F.shape == (terms, p, n2)
    opt = optimum(W, n, terms, C1, C2)
    scale = output_error2(W, C)
    assert err2(W, A, F, C) == pytest.approx(opt, rel=1e-6, abs=1e-10 * scale)
    # the optimum is a lower bound for any Kronecker sum of these sizes, e.g. the plain nearest one
    A0, F0, _ = nearest_kronecker(W, n, terms)
    assert err2(W, A0, F0, C) >= opt - 1e-9 * scale
    # the partial traces of C (what layer_fit passes) give the same fit: only C1 ⊗ C2 up to scale matters
    A2, F2 = whitened_fit(W, n, terms, *metric_factors(C, n), damping=1e-12)
    assert err2(W, A2, F2, C) == pytest.approx(opt, rel=1e-6, abs=1e-10 * scale)


def test_whitened_fit_beats_the_weight_only_fit_on_anisotropic_kronecker_inputs():
    g = gen(0)
    n, p, n2, terms = 2, 4, 4, 2
    W = torch.randn(n * p, n * n2, dtype=D, generator=g)
    C1, C2 = rand_pd(n, g, 1.5), rand_pd(n2, g, 1.5)
    C = torch.kron(C1, C2)
    A, F = whitened_fit(W, n, terms, C1, C2)
    A0, F0, _ = nearest_kronecker(W, n, terms)
    assert err2(W, A, F, C) < 0.8 * err2(W, A0, F0, C)


# ---- f_step -----------------------------------------------------------------------------------------------
def f_design(W: torch.Tensor, C: torch.Tensor, A: torch.Tensor, p: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectorised problem min_F ‖M vec(F) − b‖ equal to min_F ‖(W − Σ A_t ⊗ F_t) L‖_F (C = L Lᵀ): column k of
    M is vec(kron_matrix(A, e_k) L) for the k-th unit F, b = vec(W L)."""
    r = A.shape[0]
    L = torch.linalg.cholesky(C)
    cols = []
    for k in range(r * p * n2):
        E = torch.zeros(r * p * n2, dtype=D)
        E[k] = 1
        cols.append((kron_matrix(A, E.reshape(r, p, n2)) @ L).reshape(-1))
    return torch.stack(cols, 1), (W @ L).reshape(-1)


def brute_force_f(W: torch.Tensor, C: torch.Tensor, A: torch.Tensor, p: int, n2: int) -> torch.Tensor:
    """argmin_F ‖(W − Σ A_t ⊗ F_t) L‖_F by a dense lstsq on the vectorised problem (`f_design`)."""
    M, b = f_design(W, C, A, p, n2)
    return torch.linalg.lstsq(M, b.reshape(-1, 1)).solution.reshape(A.shape[0], p, n2)


@PROPS
@given(n=st.sampled_from([2, 3]), p=st.integers(1, 2), n2=st.integers(1, 2), seed=st.integers(0, 2 ** 16),
       terms=st.integers(1, 4))
@example(n=2, p=1, n2=2, seed=3111, terms=4)  # nearly singular: F-step and lstsq F's ~4 % apart, both near-exact
def test_f_step_is_the_exact_least_squares_f_for_a_fixed_a(n, p, n2, seed, terms):
    """The F-step's F is least-squares optimal for the fixed A: its objective equals the lstsq optimum's.

    F itself is compared only where the system is well conditioned: on a nearly singular one (e.g. n=2, p=1,
    n2=2, seed=3111, terms=4: cond(M) ≈ 1.6e4) many F's are near-exact fits and the F-step's ridge
    λ = δ·mean(diag H) (δ = 1e-12 here, the floor of `damped_cholesky`) picks one a few % away from lstsq's.
    The fit is judged in the range of M instead: since lstsq's residual is orthogonal to it,
    err(F) − err(ref) = ‖M vec(F − ref)‖², and a ridge λ moves M vec(F) by at most λ/(σ_min² + λ) · ‖b‖.
    """
    g = gen(seed)
    W = torch.randn(n * p, n * n2, dtype=D, generator=g)
    C = rand_pd(n * n2, g, 1.0)  # a generic metric, not a Kronecker product
    A = torch.randn(terms, n, n, dtype=D, generator=g)
    C4, P = C.reshape(n, n2, n, n2), (W @ C).reshape(n, p, n, n2)
    damping = 1e-12
    F = f_step(C4, P, A, damping=damping)
    assert F.shape == (terms, p, n2)
    ref = brute_force_f(W, C, A, p, n2)
    M, b = f_design(W, C, A, p, n2)
    s = torch.linalg.svdvals(M)
    lam = damping * float(s.pow(2).mean())  # δ·mean(diag H), H = MᵀM
    tol = 2 * lam / (float(s[-1]) ** 2 + lam) + 1e-10  # the ridge's share of ‖b‖, with room for round-off
    # the fitted outputs agree in the range of M (= the objective gap, without cancellation) ...
    gap = float((M @ (F - ref).reshape(-1)).norm())
    assert gap <= tol * float(b.norm())
    # ... so the objective is the least-squares optimum's, to within tol² of ‖W‖²_C
    scale = output_error2(W, C)
    assert err2(W, A, F, C) <= err2(W, A, ref, C) + (tol ** 2 + 1e-13) * scale
    # where the system is well conditioned the optimum is unique and sharp: F is lstsq's F
    if float(s[0] / s[-1]) <= 100:
        assert float((F - ref).norm()) <= 1e-7 * float(ref.norm()) + 1e-12
    # and no other F does better (perturbations only raise the error)
    base = err2(W, A, F, C)
    for _ in range(3):
        assert err2(W, A, F + 1e-3 * torch.randn(F.shape, dtype=D, generator=g), C) >= base


# ---- als_fit ----------------------------------------------------------------------------------------------
@PROPS
@given(**shapes, terms=st.integers(1, 4), N=st.integers(1, 30))
def test_als_error_never_rises_from_its_start_and_falls_with_more_sweeps(n, p, n2, seed, terms, N):
    terms = min(terms, n * n)
    g = gen(seed)
    W = torch.randn(n * p, n * n2, dtype=D, generator=g)
    X = torch.randn(N, n * n2, dtype=D, generator=g) * (1 + 10 * torch.rand(n * n2, dtype=D, generator=g))
    C = X.T @ X  # possibly singular (N < d)
    A0 = torch.randn(terms, n, n, dtype=D, generator=g)
    F0 = torch.randn(terms, p, n2, dtype=D, generator=g)
    errors = [err2(W, *als_fit(W, C, A0, F0, sweeps=s, tol=0.0), C) for s in range(5)]
    assert errors[0] == err2(W, A0, F0, C)  # zero sweeps: the start itself
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-12) + 1e-12
    A, F = als_fit(W, C, A0, F0)
    assert A.shape == A0.shape and F.shape == F0.shape


@pytest.mark.parametrize("n, p, n2, terms, seed", [(2, 3, 4, 1, 0), (2, 4, 3, 2, 1), (3, 2, 2, 3, 2),
                                                   (2, 2, 5, 3, 3), (3, 3, 2, 2, 4)])
def test_als_converges_to_the_optimum_for_a_kronecker_metric_from_the_weight_only_start(n, p, n2, terms, seed):
    g = gen(seed)
    W = torch.randn(n * p, n * n2, dtype=D, generator=g)
    C1, C2 = rand_pd(n, g, 1.0), rand_pd(n2, g, 1.0)
    C = torch.kron(C1, C2)
    A0, F0, _ = nearest_kronecker(W, n, terms)
    start = err2(W, A0, F0, C)
    opt = optimum(W, n, terms, C1, C2)
    assert start > opt * (1 + 1e-3)  # the weight-only start is not already optimal
    A, F = als_fit(W, C, A0, F0, sweeps=2000, damping=1e-12, tol=1e-13)
    assert err2(W, A, F, C) == pytest.approx(opt, rel=1e-5)


def outlier_inputs(N: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Rows with correlated channels and a few outlier channels 30x larger than the rest."""
    X = torch.randn(N, d, dtype=D, generator=g) @ torch.randn(d, d, dtype=D, generator=g) * 0.3
    X[:, torch.randperm(d, generator=g)[:2]] *= 30
    return X


@pytest.mark.parametrize("seed", range(4))
def test_als_beats_whitened_and_weight_only_fits_for_a_generic_metric(seed):
    g = gen(seed)
    n, p, n2, terms = 2, 6, 6, 2
    W = torch.randn(n * p, n * n2, dtype=D, generator=g)
    X = outlier_inputs(200, n * n2, g)
    C = X.T @ X / 200
    weight = nearest_kronecker(W, n, terms)[:2]
    whitened = whitened_fit(W, n, terms, *metric_factors(C, n))
    e_weight, e_whitened = err2(W, *weight, C), err2(W, *whitened, C)
    start = weight if e_weight <= e_whitened else whitened
    als = als_fit(W, C, *start, sweeps=50)
    e_als = err2(W, *als, C)
    assert e_als <= min(e_weight, e_whitened) * (1 + 1e-12)
    assert e_als < 0.8 * e_weight  # the outlier channels make the metric matter
    # ALS from the weight-only start alone also ends below where it began
    assert err2(W, *als_fit(W, C, *weight, sweeps=50), C) <= e_weight * (1 + 1e-12)
