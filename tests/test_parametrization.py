"""KronParametrization on every kind of weight: parameter counts, exact warm start, cold start scale,
assignment, eval cache, channels_last, autocast, forward-mode AD, attention, deepcopy and compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kronify
import kronify.kron as kron_module
from kronify import cpu_kernel, is_kron, nearest_kronecker


def reference_weight(A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Σ_t torch.kron(A_t, F_t) over the first two dims, kernel dims carried by F (F given as (t, p, q, *k))."""
    kernel = F.shape[3:]
    return sum(torch.kron(A[t].reshape(*A[t].shape, *([1] * len(kernel))), F[t]) for t in range(A.shape[0]))


def convert_one(layer: nn.Module, **kw) -> nn.Module:
    kronify.convert(nn.Sequential(layer), **kw)
    return layer


def factors(layer: nn.Module, name: str = "weight"):
    plist = layer.parametrizations[name]
    p = plist[0]
    F = plist.original1 if p.learned else plist.original
    A = plist.original0 if p.learned else p.A
    return A, F, p


KINDS = {
    "linear": (lambda: nn.Linear(8, 12), (3, 8)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 2, 2), (1, 4, 3, 3, 3)),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 12, 3, groups=2), (2, 8, 5, 5)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), (2, 4, 3, 3)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 4, 2, stride=2), (1, 2, 2, 2, 2)),
    "convT2d_grouped": (lambda: nn.ConvTranspose2d(8, 12, 3, groups=2), (2, 8, 4, 4)),
    "convT2d_depthwise": (lambda: nn.ConvTranspose2d(4, 8, 3, groups=4), (2, 4, 4, 4)),
}


# ---- parameter counts and layouts -----------------------------------------------------------------
@st.composite
def layer_specs(draw):
    n = draw(st.sampled_from([2, 3]))
    kind = draw(st.sampled_from(["linear", "conv", "convT"]))
    a, b = n * draw(st.integers(1, 3)), n * draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    k = draw(st.integers(1, 3))
    if kind == "linear":
        layer, x = nn.Linear(b, a, bias=draw(st.booleans())), torch.randn(2, b)
    elif kind == "conv":
        layer, x = nn.Conv2d(b * groups, a * groups, k, groups=groups), torch.randn(1, b * groups, 4, 4)
    else:  # weight (in, out/groups, k, k)
        layer, x = nn.ConvTranspose2d(a * groups, b * groups, k, groups=groups), torch.randn(1, a * groups, 3, 3)
    return n, draw(st.integers(1, n * n)), layer, x


@settings(max_examples=30, deadline=None)
@given(spec=layer_specs())
def test_param_count_shape_and_output_follow_the_factors(spec):
    n, terms, layer, x = spec
    cls, shape = type(layer), tuple(layer.weight.shape)
    bias = 0 if layer.bias is None else layer.bias.numel()
    rep = kronify.convert(nn.Sequential(layer), n, terms=terms)
    A, F, _ = factors(layer)
    expected = terms * n * n + terms * math.prod(shape) // (n * n)  # A plus F, counted from the dense shape
    assert rep.rows[0].params_after == expected + bias == sum(p.numel() for p in layer.parameters())
    assert isinstance(layer, cls) and tuple(layer.weight.shape) == shape and F.dim() == len(shape)
    W = reference_weight(A, F.reshape(terms, shape[0] // n, shape[1] // n, *shape[2:]))
    torch.testing.assert_close(layer.weight, W)
    dense = copy.deepcopy(kronify.merge(nn.Sequential(copy.deepcopy(layer)))[0])
    assert type(dense) is cls
    torch.testing.assert_close(layer(x), dense(x))


@pytest.mark.parametrize("kind", list(KINDS))
def test_warm_start_is_exact_at_full_terms_in_float64(kind):
    factory, shape = KINDS[kind]
    torch.manual_seed(0)
    layer = factory().double()
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    rep = kronify.convert(nn.Sequential(layer), terms=4, warm_start=True)
    assert rep.converted == ["0"], rep.skipped
    assert rep.rows[0].warm_start_error < 1e-12
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_grouped_and_depthwise_transposed_conv_counts():
    grouped = convert_one(nn.ConvTranspose2d(8, 12, 3, groups=2, bias=False))  # weight (8, 6, 3, 3)
    assert sum(p.numel() for p in grouped.parameters()) == 2 * 4 + 2 * 4 * 3 * 9
    depthwise = convert_one(nn.ConvTranspose2d(4, 8, 3, groups=4, bias=False))  # weight (4, 2, 3, 3)
    assert is_kron(depthwise) and sum(p.numel() for p in depthwise.parameters()) == 2 * 4 + 2 * 2 * 1 * 9


def test_embedding_and_norm_layers_are_not_candidates():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    rep = kronify.convert(model)
    assert [r.name for r in rep.rows] == ["2"] and not is_kron(model[0])


# ---- cold start keeps the model's own init ------------------------------------------------------------
@pytest.mark.parametrize("init", ["torch_default", "trunc_normal_002", "trained_scale"])
def test_cold_start_keeps_the_weight_std(init):
    torch.manual_seed(0)
    layer = nn.Linear(96, 64)
    if init == "trunc_normal_002":
        nn.init.trunc_normal_(layer.weight, std=0.02)
    elif init == "trained_scale":
        with torch.no_grad():
            layer.weight.mul_(7.0)
    std = float(layer.weight.std())
    bias = layer.bias.detach().clone()
    convert_one(layer, algebra="learned")
    assert float(layer.weight.std()) == pytest.approx(std, rel=1e-5)
    assert torch.equal(layer.bias, bias)
    if init == "torch_default":  # kaiming_uniform(a=√5): Var = 1/(3·fan_in)
        assert std == pytest.approx(1 / math.sqrt(3 * 96), rel=0.05)


def test_cold_start_with_a_fixed_algebra_keeps_the_std():
    layer = nn.Conv2d(8, 8, 3)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    convert_one(layer, algebra="complex")
    assert float(layer.weight.std()) == pytest.approx(float(0.02), rel=0.1)


# ---- assignment and frozen-ness ---------------------------------------------------------------------
def test_weight_assignment_projects_onto_the_nearest_kronecker_sum():
    torch.manual_seed(0)
    layer = convert_one(nn.Linear(6, 8, dtype=torch.float64), terms=2)
    W = torch.randn(8, 6, dtype=torch.float64)
    layer.weight = W
    A, F, _ = nearest_kronecker(W, 2, 2)
    torch.testing.assert_close(layer.weight, reference_weight(A, F))
    assert is_kron(layer)
    exact = reference_weight(torch.randn(2, 2, 2, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64))
    layer.weight = exact  # a Kronecker sum stays exact
    torch.testing.assert_close(layer.weight, exact)


def test_assigning_a_parameter_to_a_kronecker_weight_raises_a_clear_error_and_changes_nothing():
    """Without a patched __setattr__ torch would raise KeyError "attribute 'weight' already exists"; kronify
    turns it into an error saying what to do instead (no per-call cost: raised from the getter that
    register_parameter's hasattr calls)."""
    torch.manual_seed(0)
    layer = convert_one(nn.Linear(6, 8, dtype=torch.float64), terms=2)
    before = layer.weight.detach().clone()
    params = dict(layer.named_parameters())
    with pytest.raises(kronify.parametrization.KronAssignmentError, match=r"Assign a tensor instead.*merge"):
        layer.weight = nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="Kronecker-parametrized"):
        layer.register_buffer("weight", torch.zeros(8, 6))
    torch.testing.assert_close(layer.weight, before)
    assert dict(layer.named_parameters()).keys() == params.keys() and "weight" not in layer._parameters
    layer.weight = nn.Parameter(torch.randn(8, 6, dtype=torch.float64)).detach()  # what the message says: works
    assert not torch.allclose(layer.weight, before)


# ---- the eval-mode cache ------------------------------------------------------------------------------
def test_eval_cache_is_used_also_under_autocast_and_never_stale():
    torch.manual_seed(0)
    layer = convert_one(nn.Conv2d(4, 4, 3, padding=1))
    A, F, p = factors(layer)
    layer.eval()
    with torch.no_grad():
        w1 = layer.weight
        assert layer.weight.data_ptr() == w1.data_ptr()  # the cached tensor (read outside forward: an alias of it)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.weight.data_ptr() == w1.data_ptr()  # the built weight is float32 and reused under autocast
        F.mul_(-1)  # an in-place factor edit (optimizer step)
        torch.testing.assert_close(layer.weight, -w1, rtol=0, atol=0)
    assert layer.weight is not w1 and layer.weight.requires_grad  # grad mode: built afresh
    layer.train()
    assert p._cache is None


# ---- channels_last, autocast, low precision ------------------------------------------------------------
def test_channels_last_conversion_of_a_converted_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, stride=2))
    kronify.convert(model)
    x = torch.randn(2, 4, 6, 6)
    y = model(x)
    model.to(memory_format=torch.channels_last)
    _, F, _ = factors(model[0])
    assert F.is_contiguous(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(F.grad).all()


def test_autocast_bf16_on_cpu_builds_the_weight_in_float32():
    torch.manual_seed(0)
    layer = convert_one(nn.Linear(16, 8))
    A, F, _ = factors(layer)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.weight.dtype == torch.float32
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert F.grad.dtype == torch.float32 and torch.isfinite(F.grad).all()


def test_bfloat16_factors_accumulate_in_float32():
    torch.manual_seed(0)
    layer = convert_one(nn.Linear(64, 64), terms=4)
    A, F, p = factors(layer)
    exact = p.build(A.double(), F.double())
    layer.to(torch.bfloat16)
    A, F, _ = factors(layer)
    W = layer.weight
    assert W.dtype == torch.bfloat16
    torch.testing.assert_close(W, p.build(A.float(), F.float()).to(torch.bfloat16), rtol=0, atol=0)
    assert float((W.double() - exact).abs().max()) < 0.05 * float(exact.abs().max())


# ---- forward-mode AD ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(8, 12), (1024, 1024)], ids=["small", "large_2^20"])
def test_jvp_and_jacfwd_on_small_and_large_weights(size):
    torch.manual_seed(0)
    layer = convert_one(nn.Linear(size[1], size[0], bias=False))
    names = ["parametrizations.weight.original0", "parametrizations.weight.original1"]
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(2, size[1])
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def f(A, F):
        return torch.func.functional_call(layer, {names[0]: A, names[1]: F}, (x,))

    _, dy = torch.func.jvp(f, (params[names[0]], params[names[1]]), (tangents[names[0]], tangents[names[1]]))
    A, F = params[names[0]], params[names[1]].view(2, size[0] // 2, size[1] // 2)
    dA, dF = tangents[names[0]], tangents[names[1]].view_as(F)
    dW = reference_weight(dA, F) + reference_weight(A, dF)  # W is bilinear in (A, F)
    torch.testing.assert_close(dy, x @ dW.T, rtol=1e-4, atol=1e-4)
    if size[0] < 64:
        J = torch.func.jacfwd(f, argnums=0)(params[names[0]], params[names[1]])
        torch.testing.assert_close(J, torch.func.jacrev(f, argnums=0)(params[names[0]], params[names[1]]))


def test_large_weight_takes_the_function_path(monkeypatch):
    monkeypatch.setitem(cpu_kernel._loaded, "ops", None)  # the torch-ops routing, as without a C++ compiler
    layer = convert_one(nn.Linear(1024, 1024, bias=False))
    assert type(layer.weight.grad_fn).__name__ == "_KronWeightBackward"
    monkeypatch.setattr(kron_module, "_FUNCTION_MIN_NUMEL", 1 << 30)
    assert type(layer.weight.grad_fn).__name__ != "_KronWeightBackward"


# ---- attention -----------------------------------------------------------------------------------
class PlainSubclass(nn.MultiheadAttention):
    """A subclass that adds nothing."""


@pytest.mark.parametrize("cls, kw", [(nn.MultiheadAttention, {}), (nn.MultiheadAttention, dict(kdim=6, vdim=4)),
                                     (PlainSubclass, {}), (nn.MultiheadAttention, dict(add_bias_kv=True))],
                         ids=["packed", "separate", "subclass", "bias_kv"])
def test_attention_warm_start_exact_and_one_kronecker_sum_per_projection(cls, kw):
    torch.manual_seed(0)
    mha = cls(8, 2, batch_first=True, **kw).double()
    q = torch.randn(2, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 5, kw.get("kdim", 8), dtype=torch.float64)
    v = torch.randn(2, 5, kw.get("vdim", 8), dtype=torch.float64)
    y = mha(q, k, v)[0]
    model = nn.Sequential(mha)
    rep = kronify.convert(model, terms=4, warm_start=True)
    assert set(rep.converted) == {"0", "0.out_proj"} and type(mha) is not nn.Linear and isinstance(mha, cls)
    torch.testing.assert_close(mha(q, k, v)[0], y)
    if "kdim" in kw:
        assert all(is_kron(mha) and mha.parametrizations[n][0].chunks == 1 for n in ("q_proj_weight", "k_proj_weight"))
    else:
        A, F, p = factors(mha, "in_proj_weight")
        assert p.chunks == 3 and A.shape == (12, 2, 2) and F.shape == (3 * 4 * 4, 4)
    mha.eval()
    with torch.no_grad():  # eval (fast path where torch takes it) reads the same weights
        torch.testing.assert_close(mha(q, k, v)[0], y)


# ---- torch tooling ---------------------------------------------------------------------------------
def test_deepcopy_state_dict_keys_and_load():
    torch.manual_seed(0)
    layer = convert_one(nn.Conv2d(4, 6, 3, padding=1), terms=3)
    x = torch.randn(2, 4, 5, 5)
    y = layer(x)
    assert set(layer.state_dict()) == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x), y)
    with torch.no_grad():
        twin.parametrizations.weight.original1.add_(1)
    torch.testing.assert_close(layer(x), y)  # the copy owns its factors
    kronify.merge(nn.Sequential(twin))
    assert is_kron(layer) and not is_kron(twin)  # merging a copy leaves the original parametrized
    torch.testing.assert_close(layer(x), y)
    other = convert_one(nn.Conv2d(4, 6, 3, padding=1), terms=3)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), y)


def test_torch_compile_aot_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2))
    kronify.convert(model)
    x = torch.randn(2, 4, 6, 6)
    compiled = torch.compile(model, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    A, F, _ = factors(model[0])
    assert F.grad is not None and A.grad is not None


def test_swinmr_qkv_cold_start_keeps_trunc_normal_002():
    """The SwinMR defect: qkv weights (trunc_normal, std 0.02) started at std 0.117 as Kronecker layers."""
    zoo = pytest.importorskip("zoo")
    torch.manual_seed(0)
    dense = zoo.create("swinmr_demo")
    torch.manual_seed(0)
    kron, _ = zoo.create_kron("swinmr_demo")
    name = next(n for n, _ in dense.named_modules() if n.endswith("attn.qkv"))
    before, after = dense.get_submodule(name).weight, kron.get_submodule(name).weight
    assert is_kron(kron.get_submodule(name))
    assert float(after.std()) == pytest.approx(float(before.std()), rel=1e-4)
    assert float(after.std()) == pytest.approx(0.02, rel=0.15)


def test_attention_builds_its_packed_weight_once_per_call(monkeypatch):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    kronify.convert(nn.Sequential(mha))
    calls = []
    build = kronify.KronParametrization.build
    monkeypatch.setattr(kronify.KronParametrization, "build",
                        lambda self, *args: calls.append(self.chunks) or build(self, *args))
    x = torch.randn(2, 5, 8)
    mha(x, x, x)[0].sum().backward()  # torch's forward reads in_proj_weight 3 times
    assert sorted(calls) == [1, 3]  # in_proj (3 chunks) once, out_proj once
    with pytest.raises(AssertionError):  # an error inside forward still ends the per-call cache
        mha(x, x[:, :, :3], x)
    from torch.nn.utils import parametrize
    assert parametrize._cache_enabled == 0 and not parametrize._cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_builds_in_float32_and_keeps_the_eval_cache(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 8)).cuda()
    kronify.convert(model)
    x = torch.randn(2, 4, 6, 6, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        assert model[0].weight.dtype == torch.float32
        y = model(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    _, F, p = factors(model[0])
    assert F.grad.dtype == torch.float32 and torch.isfinite(F.grad).all()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        w = model[0].weight
        assert model[0].weight.data_ptr() == w.data_ptr()
        torch.testing.assert_close(model(x).float(), kronify.merge(copy.deepcopy(model))(x).float(), rtol=2e-2,
                                   atol=2e-2)


def test_compiled_attention_matches_and_trains():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    kronify.convert(nn.Sequential(layer))
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(layer, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    A, F, _ = factors(layer.self_attn, "in_proj_weight")
    assert F.grad is not None and torch.isfinite(F.grad).all()
    from torch.nn.utils import parametrize
    assert parametrize._cache_enabled == 0 and not parametrize._cache


def test_conversion_on_the_meta_device_gives_factor_shapes_only():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, device="meta"), nn.Flatten(), nn.MultiheadAttention(8, 2, device="meta"))
    rep = kronify.convert(model, warm_start=True)
    assert rep.converted == ["0", "2", "2.out_proj"] and rep.rows[0].warm_start_error is None
    A, F, _ = factors(model[0])
    assert F.is_meta and F.shape == (2 * 4, 2, 3, 3) and A.shape == (2, 2, 2)
    assert model[0].weight.shape == (8, 4, 3, 3)
    model.to_empty(device="cpu")
    assert model[0](torch.randn(1, 4, 5, 5)).shape == (1, 8, 3, 3)


# ---- in-place edits of the weight read from outside forward ----------------------------------------------
EDITABLE = {
    "linear": (lambda: nn.Linear(8, 6, dtype=torch.float64), "weight", (3, 8)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64), "weight", (2, 4, 5, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, dtype=torch.float64), "weight", (2, 4, 3, 3)),
    "mha_packed": (lambda: nn.MultiheadAttention(8, 2, dtype=torch.float64), "in_proj_weight", (5, 8)),
}


def _output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x, x, x)[0] if isinstance(layer, nn.MultiheadAttention) else layer(x)


def _nearest(layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
    """The nearest Kronecker sum to W, per chunk of dim 0, from kronify.nearest_kronecker (via torch.kron)."""
    p = layer.parametrizations[name][0]
    parts = []
    for w in W.chunk(p.chunks):
        A, F, _ = nearest_kronecker(w, p.n, p.terms)
        parts.append(reference_weight(A, F))
    return torch.cat(parts)


EDITS = {
    "init.normal_": lambda w: nn.init.normal_(w, std=0.3),
    "init.uniform_": lambda w: nn.init.uniform_(w, -0.5, 0.5),
    "init.kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w, a=1.0),
    "init.zeros_": nn.init.zeros_,
    "data.normal_": lambda w: w.data.normal_(),
    "no_grad mul_": lambda w: w.mul_(-3.0),
    "setitem": lambda w: w.__setitem__(0, 1.5),
    "copy_": lambda w: w.copy_(torch.randn_like(w)),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("kind", list(EDITABLE))
def test_in_place_edit_of_the_weight_is_written_back_as_the_nearest_kronecker_sum(kind, edit):
    factory, name, xshape = EDITABLE[kind]
    torch.manual_seed(0)
    layer = convert_one(factory())
    x = torch.randn(xshape, dtype=torch.float64)
    y = _output(layer, x)
    with torch.no_grad():
        w = getattr(layer, name)
        EDITS[edit](w)
        written = w.detach().clone()
    assert is_kron(layer)
    torch.testing.assert_close(getattr(layer, name), _nearest(layer, name, written))
    assert not torch.allclose(_output(layer, x), y)
    if edit == "init.zeros_":
        assert torch.count_nonzero(getattr(layer, name)) == 0


def test_full_rank_write_is_exact_and_data_assignment_writes_back():
    torch.manual_seed(0)
    layer = convert_one(nn.Conv2d(4, 6, 3, dtype=torch.float64), terms=4)
    W = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    layer.weight.data.copy_(W)
    torch.testing.assert_close(layer.weight, W, rtol=1e-12, atol=1e-12)
    layer.weight.data = 2 * W
    torch.testing.assert_close(layer.weight, 2 * W, rtol=1e-12, atol=1e-12)


def test_gradients_through_a_weight_read_outside_forward_reach_the_factors():
    torch.manual_seed(0)
    layer = convert_one(nn.Linear(8, 6, dtype=torch.float64))
    A, F, _ = factors(layer)
    layer.weight.pow(2).sum().backward()
    a, f = A.detach().requires_grad_(), F.detach().requires_grad_()
    gA, gF = torch.autograd.grad(reference_weight(a, f.view(2, 3, 4)).pow(2).sum(), [a, f])  # via torch.kron
    torch.testing.assert_close(A.grad, gA)
    torch.testing.assert_close(F.grad, gF)


def test_reads_inside_forward_are_plain_tensors_and_reads_in_hooks_are_linked(monkeypatch):
    layer = convert_one(nn.Linear(8, 6))
    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(type(w)) or linear(x, w, b))
    layer.register_forward_pre_hook(lambda m, args: seen.append(type(m.weight)))  # a hook is not the forward
    layer(torch.randn(2, 8))
    assert seen == [kronify.parametrization.LinkedWeight, torch.Tensor]
    assert type(layer.weight) is kronify.parametrization.LinkedWeight  # outside forward: linked
    with kronify.parametrization.plain_reads():
        assert type(layer.weight) is torch.Tensor


def test_hugging_face_style_init_loop_and_merge_gives_plain_tensors():
    """At terms = n² every weight is a Kronecker sum, so the written init is kept exactly (at fewer terms it is
    its nearest Kronecker sum, whose std is smaller: the projection drops the energy of the other terms)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.MultiheadAttention(64, 4))
    kronify.convert(model, terms=4)
    for module in model.modules():  # transformers' _init_weights idiom
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=0.02)
    stds = [float(m.weight.std()) for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(s == pytest.approx(0.02, rel=0.15) for s in stds), stds
    kronify.merge(model)
    for t in [*model.parameters(), *model.state_dict().values()]:
        assert type(t) in (torch.Tensor, nn.Parameter)
    assert not model[0]._forward_pre_hooks and not model[3]._forward_pre_hooks
    assert type(model[0].weight) is nn.Parameter and type(model[3].in_proj_weight) is nn.Parameter
