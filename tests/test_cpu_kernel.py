"""kronify's fused CPU kernel (kronify.cpu_kernel, kronify/csrc/kron_cpu.cpp): the same weight and gradients as
the torch ops, used only for CPU training builds, and a training run that never fails without it."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kronify
import kronify.kron as kron_module
from kronify import cpu_kernel
from kronify.kron import _kron_weight, _kron_weight_composite
from kronify.weight_memory import WeightMemory

PROPS = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def ops():
    """The compiled kernel. Where a C++ compiler exists it must build: a broken build fails here, not skips."""
    built = cpu_kernel.ops()
    if built is None:
        if shutil.which("c++") and cpu_kernel.enabled():
            pytest.fail("a C++ compiler is on PATH but kronify's CPU kernel did not build (see the warning)")
        pytest.skip("no C++ compiler or KRONIFY_CPU_KERNEL=0")
    return built


@pytest.fixture(autouse=True)
def kernel_at_every_size(monkeypatch):
    """The kernel for small weights too (kronify takes it from 2¹⁷ entries on), so that shapes stay cheap."""
    monkeypatch.setattr(kron_module, "_KERNEL_MIN_NUMEL", 0)


def factors(terms, n, p, q, kernel, dtype, requires_grad=True):
    A = torch.randn(terms, n, n, dtype=dtype, requires_grad=requires_grad)
    F = torch.randn(terms, p, q, *kernel, dtype=dtype, requires_grad=requires_grad)
    return A, F


@PROPS
@given(n=st.integers(2, 5), p=st.integers(1, 40), q=st.integers(1, 40), kernel=st.lists(st.integers(1, 3), max_size=2),
       dtype=st.sampled_from([torch.float32, torch.float64]), data=st.data())
def test_kernel_weight_and_gradients_equal_the_torch_ops(ops, n, p, q, kernel, dtype, data):
    terms = data.draw(st.integers(1, n * n))
    need_A, need_F = data.draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    A, F = factors(terms, n, p, q, kernel, dtype, requires_grad=False)
    A.requires_grad_(need_A)
    F.requires_grad_(need_F)
    W = _kron_weight(A, F)
    assert W.grad_fn is not None and "KronWeight" in type(W.grad_fn).__name__  # the kernel's Function took it
    expected = _kron_weight_composite(A, F)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(W, expected, **tol)
    G = torch.randn_like(W)
    inputs = [x for x in (A, F) if x.requires_grad]
    for got, want in zip(torch.autograd.grad(W, inputs, G), torch.autograd.grad(expected, inputs, G)):
        torch.testing.assert_close(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * p * q)


def test_kernel_passes_gradcheck_and_double_backward(ops):
    A, F = factors(3, 2, 4, 3, (2,), torch.float64)
    assert torch.autograd.gradcheck(_kron_weight, (A, F))
    assert torch.autograd.gradgradcheck(_kron_weight, (A, F))  # create_graph differentiates the composite


def test_kernel_result_does_not_depend_on_the_thread_count(ops):
    A, F = factors(2, 2, 300, 257, (), torch.float32)
    G = torch.randn(600, 514)
    threads = torch.get_num_threads()
    results = []
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            W = _kron_weight(A, F)
            results.append([W.detach(), *torch.autograd.grad(W, (A, F), G)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_kernel_writes_into_free_weight_memory(ops):
    memory = WeightMemory()
    A, F = factors(2, 2, 64, 64, (), torch.float32)
    first = _kron_weight(A, F, memory)
    ptr = first.data_ptr()
    del first  # nothing holds the weight any more: the next build reuses its memory
    second = _kron_weight(A, F, memory)
    assert second.data_ptr() == ptr
    torch.testing.assert_close(second, _kron_weight_composite(A, F))


def test_kernel_builds_only_for_training(ops, monkeypatch):
    """No-grad builds (inference, merge), low precision and small weights never touch the kernel, so they never
    compile it."""
    calls = []
    monkeypatch.setitem(cpu_kernel._loaded, "ops", None)
    monkeypatch.setattr(cpu_kernel, "ops", lambda: calls.append(1))
    A, F = factors(2, 2, 8, 8, (), torch.float32)
    with torch.no_grad():
        _kron_weight(A, F)
    _kron_weight(A.detach(), F.detach())
    _kron_weight(A.bfloat16(), F.bfloat16())  # the layers upcast low precision before building
    monkeypatch.setattr(kron_module, "_KERNEL_MIN_NUMEL", 257)
    _kron_weight(A, F)  # 256 entries: torch ops
    assert calls == []
    monkeypatch.setattr(kron_module, "_KERNEL_MIN_NUMEL", 256)
    _kron_weight(A, F)
    assert calls == [1]


def test_a_converted_layer_trains_the_same_with_and_without_the_kernel(ops, monkeypatch):
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 8, 3, padding=1)
    x, target = torch.randn(2, 8, 10, 10), torch.randn(2, 8, 10, 10)

    def train(use_kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setitem(cpu_kernel._loaded, "ops", ops if use_kernel else None)
        model = nn.Sequential(copy.deepcopy(dense))
        kronify.convert(model, n=2, warm_start=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for got, want in zip(train(True), train(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "0")
    monkeypatch.delitem(cpu_kernel._loaded, "ops", raising=False)
    assert not cpu_kernel.enabled()
    assert cpu_kernel.ops() is None


def test_a_failed_build_warns_once_and_training_uses_torch_ops(monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Error building extension: no compiler")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.delitem(cpu_kernel._loaded, "ops", raising=False)
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "1")
    A, F = factors(2, 2, 5, 5, (), torch.float32)
    with pytest.warns(RuntimeWarning, match="could not build its CPU kernel.*no compiler.*KRONIFY_CPU_KERNEL=0"):
        W = _kron_weight(A, F)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W2 = _kron_weight(A, F)  # no second warning: the failure is remembered for the process
    torch.testing.assert_close(W, _kron_weight_composite(A, F))
    torch.testing.assert_close(W2, W)
    W.sum().backward()
    assert A.grad is not None and F.grad is not None


def test_kronify_routes_large_training_builds_to_the_kernel(ops, monkeypatch):
    """By default (threshold 2¹⁷ entries) a 512×512 linear's training build takes the kernel and a 256×256 one not."""
    monkeypatch.undo()  # kronify's own threshold
    calls = []
    monkeypatch.setattr(cpu_kernel, "ops", lambda: calls.append(1) or ops)
    for width, used in ((256, []), (512, [1])):
        layer = nn.Linear(width, width)
        kronify.convert(nn.Sequential(layer), n=2)
        layer(torch.randn(3, width)).sum().backward()
        assert calls == used


def test_kernel_rejects_bad_factors_by_name(ops):
    """The compiled ops check what they read: no term, a dtype mismatch, a wrong out buffer."""
    A, F = torch.randn(0, 2, 2), torch.randn(0, 3, 3)
    with pytest.raises(RuntimeError, match="at least one term"):
        ops.kron_forward(A, F, None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.kron_forward(torch.randn(1, 2, 2), torch.randn(1, 3, 3, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.kron_forward(torch.randn(1, 2, 2), torch.randn(1, 3, 3), torch.empty(5))
