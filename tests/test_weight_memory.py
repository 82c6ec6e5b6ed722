"""kronify.weight_memory: a large weight's memory is reused from build to build on CPU, never while held."""

from __future__ import annotations

import copy
import math
import pickle

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kronify
from kronify.kron import _FUNCTION_MIN_NUMEL, _kron_weight
from kronify.weight_memory import WeightMemory

N, P = 2, 512  # W (1024, 1024): above the threshold, so _KronWeight builds it


def factors(seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A, F = torch.randn(N, N, N, generator=g), torch.randn(N, P, P, generator=g)
    return A.requires_grad_(requires_grad), F.requires_grad_(requires_grad)


def test_threshold_puts_these_weights_on_the_function_path():
    assert (N * P) ** 2 >= _FUNCTION_MIN_NUMEL


def test_memory_is_reused_once_the_previous_weight_is_gone():
    memory = WeightMemory()
    W1 = _kron_weight(*factors(0), memory)
    ptr = W1.data_ptr()
    del W1
    W2 = _kron_weight(*factors(1), memory)
    assert W2.data_ptr() == ptr
    torch.testing.assert_close(W2, _kron_weight(*factors(1)), rtol=0, atol=0)


def test_a_held_weight_is_never_written_over():
    memory = WeightMemory()
    W1 = _kron_weight(*factors(0), memory)
    view = W1[:3]  # a view holds the memory too
    W2 = _kron_weight(*factors(1), memory)
    assert W2.data_ptr() != W1.data_ptr()
    torch.testing.assert_close(W1, _kron_weight(*factors(0)), rtol=0, atol=0)
    del W1
    W3 = _kron_weight(*factors(2), memory)  # W2's memory is now the kept one, and W2 is still alive
    assert W3.data_ptr() not in (W2.data_ptr(), view.data_ptr())
    torch.testing.assert_close(view, _kron_weight(*factors(0))[:3], rtol=0, atol=0)


def two_forwards_one_backward(memory: WeightMemory | None, retain: bool) -> list[torch.Tensor]:
    """Gradients of Σ_k <W_k, G_k> for two weights built one after the other, W_1 saved by autograd only.
    dL/dG_k = W_k: a W_1 written over by W_2 would show in G_1's gradient."""
    (A1, F1), (A2, F2) = factors(0, True), factors(1, True)
    g = torch.Generator().manual_seed(2)
    G1, G2 = (torch.randn(N * P, N * P, generator=g).requires_grad_() for _ in range(2))
    loss1 = (_kron_weight(A1, F1, memory) * G1).sum()  # W_1 lives on only as the tensor mul saved
    loss2 = (_kron_weight(A2, F2, memory) * G2).sum()
    if retain:
        loss1.backward(retain_graph=True)
        _kron_weight(*factors(3), memory)  # a build while loss1's graph still holds W_1
    (loss1 + loss2).backward()
    return [t.grad for t in (A1, F1, A2, F2, G1, G2)]


def test_two_forwards_before_one_backward_and_retained_graphs_stay_correct():
    for retain in (False, True):
        want = two_forwards_one_backward(None, retain)
        got = two_forwards_one_backward(WeightMemory(), retain)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(first=st.lists(st.integers(1, 6), min_size=1, max_size=4), second=st.lists(st.integers(1, 6), min_size=1,
                                                                                 max_size=4))
def test_reuse_needs_the_same_bytes_and_gives_the_asked_shape(first, second):
    memory = WeightMemory()
    W1 = memory.empty(tuple(first), torch.float32, torch.device("cpu"))
    ptr = W1.data_ptr()
    del W1
    W2 = memory.empty(tuple(second), torch.float32, torch.device("cpu"))
    assert W2.shape == tuple(second) and W2.is_contiguous()
    assert (W2.data_ptr() == ptr) == (math.prod(first) == math.prod(second))


def test_other_devices_are_not_kept():
    memory = WeightMemory()
    W = memory.empty((4, 4), torch.float32, torch.device("meta"))
    assert W.is_meta and memory._storage is None


def train(layer: nn.Module, steps: int) -> list[torch.Tensor]:
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 256, 4, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in layer.parameters()]


def test_a_converted_layer_trains_exactly_as_without_reuse():
    torch.manual_seed(0)
    layer = nn.Conv2d(256, 256, 3, padding=1)  # 0.59 M entries
    kronify.convert(layer)
    plain = copy.deepcopy(layer)
    memory = layer.parametrizations.weight[0]._memory
    plain.parametrizations.weight[0]._memory = None  # builds allocate anew
    assert copy.deepcopy(memory)._storage is None and pickle.loads(pickle.dumps(memory))._storage is None
    for got, want in zip(train(layer, 3), train(plain, 3)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert memory._storage is not None  # it was used
    layer.eval()
    assert memory._storage is None  # train()/eval() and .to() let it go


def test_a_pickled_parametrization_from_before_weight_memory_still_loads_and_builds():
    """torch pickles parametrized modules only through state_dict, but a KronParametrization pickles on its own."""
    layer = nn.Conv2d(256, 256, 3, padding=1)
    kronify.convert(layer)
    p = layer.parametrizations.weight[0]
    A, F = (t.detach() for t in layer.parametrizations.weight.parameters())
    del p.__dict__["_memory"]  # what an older kronify pickled
    loaded = pickle.loads(pickle.dumps(p))
    assert isinstance(loaded._memory, WeightMemory)
    torch.testing.assert_close(loaded(A, F), p.build(A, F), rtol=0, atol=0)
