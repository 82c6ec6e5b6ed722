"""The hot path of a converted layer: no forward hooks, no patched __setattr__ or forward; reads of a Kronecker
weight inside a forward are plain tensors (decided per read and per thread, from the reading frame); every
read from outside is a LinkedWeight whose in-place edits are written back, so no edit form is lost silently;
nn.MultiheadAttention builds its packed weight once per call without hooks."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import kronify
from kronify import is_kron, nearest_kronecker
from kronify.linked_weight import _ONCE_CACHE, KronAssignmentError, LinkedWeight, plain_reads

LAYERS = {
    "linear": (lambda: nn.Linear(8, 6), (3, 8)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), (1, 2, 4, 4, 4)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), (2, 4, 3, 3)),
    "mha": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), (2, 5, 8)),
    "mha_kdim": (lambda: nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True), None),
}


def _run(layer: nn.Module, x: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.MultiheadAttention):
        if x is None:  # kdim / vdim differ: cross-attention
            q, k, v = torch.randn(2, 5, 8), torch.randn(2, 3, 4), torch.randn(2, 3, 6)
            return layer(q, k, v)[0]
        return layer(x, x, x)[0]
    return layer(x)


def _converted(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor | None]:
    factory, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = factory()
    model = nn.Sequential(layer)
    kronify.convert(model)
    return model, layer, None if shape is None else torch.randn(shape)


class _LinkedArgs(TorchFunctionMode):
    """Records every torch function that receives a LinkedWeight (the slow, linked path)."""

    def __init__(self) -> None:
        super().__init__()
        self.linked: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, LinkedWeight) for a in tree_leaves((args, kwargs))):
            self.linked.append(func)
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_converted_layers_carry_no_hooks_no_setattr_and_no_forward_override(kind):
    model, layer, x = _converted(kind)
    assert is_kron(layer)
    for m in model.modules():
        assert not (m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks), m
        assert type(m).__setattr__ is nn.Module.__setattr__
        assert type(m).__call__ is nn.Module.__call__
        if is_kron(m):  # torch's parametrized class adds no forward of its own
            assert "forward" not in vars(type(m))
    assert not (torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks)
    _run(layer, x).sum().backward()


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_reads_inside_forward_are_plain_and_reads_outside_are_linked(kind, mode):
    model, layer, x = _converted(kind)
    model.train(mode == "train")
    names = [n for n, _ in layer.parametrizations.items()]
    with _LinkedArgs() as seen:
        if mode == "eval_no_grad":
            with torch.no_grad():
                _run(layer, x)
        else:
            _run(layer, x).sum().backward()
    assert seen.linked == []
    for name in names:
        assert type(getattr(layer, name)) is LinkedWeight
    if isinstance(layer, nn.MultiheadAttention):  # its forward reads out_proj.weight, a child's weight: plain
        assert is_kron(layer.out_proj)


class _Double(nn.Module):
    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return 2 * W


@pytest.mark.parametrize("algebra", ["learned", "complex"])
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_reads_take_the_factors_directly_and_equal_torchs_getter(monkeypatch, algebra, mode):
    """A read calls the Kronecker parametrization on the factors itself, skipping the ParametrizationList's call,
    and gives what torch's getter gives (under parametrize.cached(), which takes torch's getter); a parametrization
    stacked on it by the user is applied."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    kronify.convert(nn.Sequential(layer), algebra=algebra)
    layer.train(mode == "train")
    calls = []
    list_forward = parametrize.ParametrizationList.forward
    monkeypatch.setattr(parametrize.ParametrizationList, "forward", lambda s: calls.append(1) or list_forward(s))
    with torch.set_grad_enabled(mode == "train"):
        W = layer(torch.eye(8)).T - layer.bias[:, None]  # the weight as the forward used it
        assert calls == []
        with parametrize.cached():
            want = layer(torch.eye(8)).T - layer.bias[:, None]
        assert calls == [1]
        torch.testing.assert_close(W, want, rtol=0, atol=0)
        parametrize.register_parametrization(layer, "weight", _Double(), unsafe=True)
        torch.testing.assert_close(layer(torch.eye(8)).T - layer.bias[:, None], 2 * want)


def test_hooks_on_the_parametrization_run_as_under_torchs_getter():
    """A hook on the Kronecker parametrization (or a global module hook) makes reads go through nn.Module's call,
    so the hook runs and its result is the weight, as with torch's own getter."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    kronify.convert(nn.Sequential(layer))
    x = torch.randn(3, 8)
    handle = layer.parametrizations.weight[0].register_forward_hook(lambda m, args, W: torch.zeros_like(W))
    torch.testing.assert_close(layer(x), layer.bias.expand(3, 6), rtol=0, atol=0)
    handle.remove()
    assert layer(x).sub(layer.bias).abs().max() > 0
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        layer(x)
    finally:
        handle.remove()
    assert seen == ["KronParametrization", "ParametrizationList", "ParametrizedLinear"]


def test_a_parent_forward_reading_a_child_weight_gets_the_plain_tensor():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.linear(self.proj(x), self.proj.weight.t())  # read by the parent

    model = Tied()
    kronify.convert(model)
    with _LinkedArgs() as seen:
        model(torch.randn(2, 8)).sum().backward()
    assert seen.linked == []


def test_an_in_place_edit_in_a_forward_hook_is_written_back():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    kronify.convert(nn.Sequential(layer))

    def hook(m, args):
        with torch.no_grad():
            torch.nn.init.zeros_(m.weight)

    layer.register_forward_pre_hook(hook)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), layer.bias.expand(3, 6))
    assert torch.count_nonzero(layer.weight) == 0


# ---- every in-place edit form is written back (projected onto the nearest Kronecker sum) ------------------
def _edit_data_set(layer, w):
    v = torch.randn_like(w)
    w.data = v
    return v


EDIT_FORMS = {
    "init.normal_": lambda layer, w: nn.init.normal_(w, std=0.3),
    "init.trunc_normal_": lambda layer, w: nn.init.trunc_normal_(w, std=0.02),
    "init.xavier_uniform_": lambda layer, w: nn.init.xavier_uniform_(w),
    "init.kaiming_normal_": lambda layer, w: nn.init.kaiming_normal_(w),
    "init.zeros_": lambda layer, w: nn.init.zeros_(w),
    "init.constant_": lambda layer, w: nn.init.constant_(w, 0.25),
    "data.normal_": lambda layer, w: w.data.normal_(),
    "data.uniform_": lambda layer, w: w.data.uniform_(-1, 1),
    "data.setitem": lambda layer, w: w.data.__setitem__((0, 0), 2.5) or w.data,
    "data.copy_": lambda layer, w: w.data.copy_(torch.randn_like(w)),
    "data = v": _edit_data_set,
    "mul_": lambda layer, w: w.mul_(-2.0),
    "add_": lambda layer, w: w.add_(torch.randn_like(w)),
    "fill_": lambda layer, w: w.fill_(0.5),
    "clamp_": lambda layer, w: w.clamp_(-0.05, 0.05),
    "iadd": lambda layer, w: w.__iadd__(1.0),
    "setitem": lambda layer, w: w.__setitem__(0, 1.5) or w,
    "copy_": lambda layer, w: w.copy_(torch.randn_like(w)),
    "out=": lambda layer, w: torch.mul(w, 3.0, out=w),
    "inplace=True": lambda layer, w: torch.nn.functional.relu(w, inplace=True),
}


def _nearest_sum(layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
    p = layer.parametrizations[name][0]
    parts = []
    for w in W.chunk(p.chunks):
        A, F, _ = nearest_kronecker(w, p.n, p.terms)
        parts.append(sum(torch.kron(A[t].reshape(p.n, p.n, *[1] * (F.dim() - 3)), F[t]) for t in range(p.terms)))
    return torch.cat(parts)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["linear", "conv2d", "convT2d", "mha"]), n=st.sampled_from([2, 3]),
       rows=st.integers(1, 3), cols=st.integers(1, 3), full=st.booleans(),
       edit=st.sampled_from(sorted(EDIT_FORMS)), seed=st.integers(0, 2 ** 16))
def test_no_in_place_edit_form_is_lost(kind, n, rows, cols, full, edit, seed):
    torch.manual_seed(seed)
    d0, d1 = rows * n, cols * n
    layer = {"linear": lambda: nn.Linear(d1, d0), "conv2d": lambda: nn.Conv2d(d1, d0, 3),
             "convT2d": lambda: nn.ConvTranspose2d(d0, d1, 2),
             "mha": lambda: nn.MultiheadAttention(d0, 1)}[kind]().double()
    name = "in_proj_weight" if kind == "mha" else "weight"
    kronify.convert(nn.Sequential(layer), n=n, terms=n * n if full else None)
    before = getattr(layer, name).detach().clone()
    with torch.no_grad():
        w = getattr(layer, name)
        assert type(w) is LinkedWeight
        written = EDIT_FORMS[edit](layer, w).detach().clone()
    assert is_kron(layer)
    now = getattr(layer, name).detach()
    torch.testing.assert_close(now, _nearest_sum(layer, name, written))
    if full:  # at terms = n² every weight is a Kronecker sum: the edit is kept exactly
        torch.testing.assert_close(now, written)
    if not torch.allclose(written, before):
        assert not torch.allclose(now, before) or torch.allclose(_nearest_sum(layer, name, written), before)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "convT2d", "mha"])
def test_reset_parameters_is_written_back(kind):
    model, layer, x = _converted(kind)
    name = "in_proj_weight" if kind == "mha" else "weight"
    with torch.no_grad():
        setattr(layer, name, torch.zeros_like(getattr(layer, name)))
    assert torch.count_nonzero(getattr(layer, name)) == 0
    layer._reset_parameters() if kind == "mha" else layer.reset_parameters()  # reads self.<name>, edits in place
    assert is_kron(layer) and torch.count_nonzero(getattr(layer, name)) > 0


def test_assigning_a_parameter_says_what_to_do_instead():
    _, layer, _ = _converted("conv2d")
    with pytest.raises(KronAssignmentError, match=r"Conv2d\.weight is Kronecker-parametrized.*Assign a tensor"):
        layer.weight = nn.Parameter(torch.zeros(6, 4, 3, 3))
    assert is_kron(layer) and "weight" not in layer._parameters


# ---- thread safety ----------------------------------------------------------------------------------
class _Blocking(nn.Linear):
    """A Linear whose forward reads its weight, then waits: another thread acts while it is inside forward."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.entered, self.release, self.seen = threading.Event(), threading.Event(), []

    def forward(self, x):
        w = self.weight
        self.seen.append(type(w))
        self.entered.set()
        assert self.release.wait(30)
        return torch.nn.functional.linear(x, w, self.bias)


def test_an_edit_from_another_thread_while_a_forward_runs_is_not_lost():
    """With a global "inside forward" counter (the old hooks) this edit would be a plain read and be lost."""
    torch.manual_seed(0)
    layer = _Blocking(8, 6)
    kronify.convert(nn.Sequential(layer))
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("y", layer(torch.randn(2, 8))))
    worker.start()
    try:
        assert layer.entered.wait(30)
        w = layer.weight  # this thread is not inside a forward, though another thread is
        assert type(w) is LinkedWeight
        with torch.no_grad():
            nn.init.zeros_(w)
        assert torch.count_nonzero(layer.weight) == 0
        with plain_reads():  # plain_reads is per thread too
            assert type(layer.weight) is torch.Tensor
    finally:
        layer.release.set()
        worker.join(30)
    assert layer.seen == [torch.Tensor] and out["y"].shape == (2, 6)


def test_concurrent_training_threads_see_plain_weights_and_match_one_thread():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.MultiheadAttention(32, 4, batch_first=True))
    kronify.convert(model)
    lin, mha = model[0], model[2]
    x = torch.randn(4, 5, 16)

    def loss():
        h = lin(x)
        return mha(h, h, h)[0].square().mean()

    expected = [g.clone() for g in torch.autograd.grad(loss(), list(model.parameters()))]
    errors = []

    def work():
        try:
            with _LinkedArgs() as seen:
                for _ in range(10):
                    got = torch.autograd.grad(loss(), list(model.parameters()))
                    for g, e in zip(got, expected):
                        torch.testing.assert_close(g, e)
            assert seen.linked == []
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]


# ---- nn.MultiheadAttention: one build per call, no hooks ---------------------------------------------------
def test_attention_build_once_never_reuses_a_freed_graph():
    """Two forward/backward passes without an optimizer step (gradient accumulation), grad-enabled eval,
    and a step in between all rebuild or reuse correctly."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    dense = nn.MultiheadAttention(8, 2, batch_first=True)
    kronify.convert(nn.Sequential(mha), terms=4)
    with plain_reads():
        dense.load_state_dict({"in_proj_weight": mha.in_proj_weight.detach(), "in_proj_bias": mha.in_proj_bias,
                               "out_proj.weight": mha.out_proj.weight.detach(), "out_proj.bias": mha.out_proj.bias})
    x = torch.randn(2, 5, 8)
    for m in (mha, dense):
        for _ in range(2):
            m(x, x, x)[0].square().sum().backward()
    with plain_reads():
        g = torch.autograd.grad(mha.in_proj_weight, mha.parametrizations.in_proj_weight.original1,
                                dense.in_proj_weight.grad)[0]
    torch.testing.assert_close(mha.parametrizations.in_proj_weight.original1.grad, g)
    opt = torch.optim.SGD(mha.parameters(), lr=0.1)
    opt.step()
    mha.eval()
    y = mha(x, x, x)[0]
    with plain_reads():
        ref = torch.nn.functional.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 8, 2, mha.in_proj_weight, mha.in_proj_bias,
            None, None, False, 0.0, mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False)[0]
    torch.testing.assert_close(y, ref.transpose(0, 1))
    y.sum().backward()
    copy.deepcopy(mha)  # the per-call build cache is not part of the module: deepcopy works after a forward


def test_an_undone_conversion_keeps_no_attention_weight_built_by_its_forwards(monkeypatch):
    """A calibrated conversion whose fit fails after forwards ran is undone (kronify.apply.Undo): the weights
    nn.MultiheadAttention built once per call then are dropped with it, not kept as long as the model lives."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    def calibrate(model, *args):
        with torch.no_grad():
            model(x)
        raise RuntimeError("fit failed")

    model, x = Attention(), torch.randn(2, 5, 8)
    monkeypatch.setattr("kronify.calibration.apply.calibrate", calibrate)
    with pytest.raises(RuntimeError, match="fit failed"):
        kronify.convert(model, n=2, warm_start=True, calibration=[x])
    assert type(model.mha) is nn.MultiheadAttention and not is_kron(model.mha.out_proj)
    assert not set(model.modules()) & set(_ONCE_CACHE.keys())
