"""Kronecker layers (kronify.layers): torch-compatible arguments, shapes, counts, init, conversion, caching."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronify import (
    KRON_LAYER_FOR,
    KronConv1d,
    KronConv2d,
    KronConv3d,
    KronConvTranspose2d,
    KronConvTranspose3d,
    KronLinear,
    kron_param_count,
    kron_weight,
)

PROPS = settings(max_examples=60, deadline=None)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def layer_specs(draw):
    """(torch class, positional/keyword args, input shape, n, terms, algebra) for a random small layer."""
    n = draw(st.sampled_from([2, 3, 4, 5]))
    algebra = "learned"
    if n in (2, 4) and draw(st.booleans()):
        algebra = {2: "complex", 4: "quaternion"}[n]
    terms = n if algebra != "learned" else draw(st.integers(1, n * n))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["linear", "conv", "convT"]))
    if kind == "linear":
        fin, fout = n * draw(st.integers(1, 3)), n * draw(st.integers(1, 3))
        lead = draw(st.lists(st.integers(1, 3), max_size=2))
        return nn.Linear, {"in_features": fin, "out_features": fout, "bias": bias}, (batch, *lead, fin), n, terms, algebra
    d = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    cin, cout = n * groups * draw(st.integers(1, 2)), n * groups * draw(st.integers(1, 2))
    k = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    size = dilation * (k - 1) + 1 + draw(st.integers(0, 3 if d < 3 else 1))
    kw = dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=stride, padding=padding,
              dilation=dilation, groups=groups, bias=bias)
    if kind == "conv":
        return CONV[d], kw, (batch, cin) + (size,) * d, n, terms, algebra
    kw["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    if (size - 1) * stride - 2 * padding + dilation * (k - 1) + kw["output_padding"] + 1 < 1:
        kw["padding"] = 0  # torch rejects an empty transposed-conv output
    return CONVT[d], kw, (batch, cin) + (size,) * d, n, terms, algebra


def weight_dims(dense: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in_per_group, kernel) in the layer sense, for kron_param_count."""
    if isinstance(dense, nn.Linear):
        return dense.out_features, dense.in_features, ()
    return dense.out_channels, dense.in_channels // dense.groups, tuple(dense.kernel_size)


@PROPS
@given(spec=layer_specs())
def test_layer_properties(spec):
    torch_cls, kw, in_shape, n, terms, algebra = spec
    layer = KRON_LAYER_FOR[torch_cls](**kw, n=n, terms=terms, algebra=algebra)
    dense = torch_cls(**kw)
    assert isinstance(layer, torch_cls) and layer.weight.shape == dense.weight.shape

    out, in_pg, kernel = weight_dims(dense)
    expected = kron_param_count(out, in_pg, kernel, n, terms, kw["bias"], algebra=algebra)
    assert sum(p.numel() for p in layer.parameters()) == expected
    formula = terms * n * n * (algebra == "learned") + terms * (out // n) * (in_pg // n) * math.prod(kernel)
    assert expected == formula + (out if kw["bias"] else 0)

    x = torch.randn(in_shape, requires_grad=True)
    y = layer(x)
    assert y.shape == dense(x).shape
    y.square().sum().backward()
    grads = [x.grad, layer.F.grad] + ([layer.A.grad] if algebra == "learned" else [])
    assert torch.isfinite(y).all() and all(g is not None and torch.isfinite(g).all() for g in grads)

    merged = layer.to_dense()
    assert type(merged) is torch_cls
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-6)


def test_state_dict_holds_factors_not_weight():
    layer = KronConv2d(4, 6, 3, n=2, terms=3)
    assert set(layer.state_dict()) == {"A", "F", "bias"}
    assert {k for k, _ in layer.named_parameters()} == {"A", "F", "bias"}
    assert not isinstance(layer.weight, nn.Parameter) and layer.weight.grad_fn is not None
    fixed = KronConv2d(4, 8, 3, n=4, algebra="quaternion", bias=False)
    assert set(fixed.state_dict()) == {"A", "F"}
    assert {k for k, _ in fixed.named_parameters()} == {"F"} and "A" in dict(fixed.named_buffers())
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(6, 4, 3, 3)


@pytest.mark.parametrize(
    "layer",
    [
        KronLinear(512, 512, n=2),
        KronConv2d(128, 128, 3, n=4),
        KronConv2d(64, 128, 3, n=2, terms=1),
        KronConvTranspose2d(128, 64, 3, n=4, algebra="quaternion"),
    ],
    ids=["linear", "conv-n4", "conv-terms1", "convT-quaternion"],
)
def test_cold_start_variance_matches_torch_default(layer):
    dense = layer._dense_cls(**layer._torch_kwargs(layer))
    fan_in = dense.weight[0].numel()
    target = 1 / (3 * fan_in)  # kaiming_uniform_(a=√5) = U(±1/√fan_in)
    assert dense.weight.var().item() == pytest.approx(target, rel=0.03)
    assert layer.weight.var().item() == pytest.approx(target, rel=0.05)
    assert layer.weight.mean().abs().item() < 0.05 * math.sqrt(target)
    bound = 1 / math.sqrt(fan_in)
    assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.5 * bound


ALL_KINDS = [
    (nn.Linear, dict(in_features=6, out_features=4), (3, 6)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 9)),
    (nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, groups=2), (2, 4, 7, 7)),
    (nn.Conv3d, dict(in_channels=4, out_channels=4, kernel_size=2, dilation=2), (1, 4, 5, 5, 5)),
    (nn.ConvTranspose1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, output_padding=1), (2, 4, 5)),
    (nn.ConvTranspose2d, dict(in_channels=8, out_channels=4, kernel_size=3, groups=2, dilation=2), (2, 8, 4, 4)),
    (nn.ConvTranspose3d, dict(in_channels=4, out_channels=4, kernel_size=2, stride=2), (1, 4, 3, 3, 3)),
]


@pytest.mark.parametrize("torch_cls,kw,in_shape", ALL_KINDS, ids=lambda v: getattr(v, "__name__", ""))
def test_from_dense_warm_start_is_exact_at_full_terms(torch_cls, kw, in_shape):
    dense = torch_cls(**kw, dtype=torch.float64)
    before = copy.deepcopy(dense.state_dict())
    layer = KRON_LAYER_FOR[torch_cls].from_dense(dense, n=2, terms=4, warm_start=True)
    assert type(layer) is KRON_LAYER_FOR[torch_cls] and layer.F.dtype == torch.float64
    assert layer.warm_start_error < 1e-10
    rel = (layer.weight - dense.weight).norm() / dense.weight.norm()
    assert rel < 1e-10
    x = torch.randn(in_shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-12)
    for k, v in dense.state_dict().items():  # the source layer is untouched
        assert torch.equal(v, before[k])
    back = layer.to_dense()
    assert type(back) is torch_cls and repr(back) == repr(dense)


def test_from_dense_default_terms_error_and_cold_start():
    dense = nn.Conv2d(8, 8, 3, dtype=torch.float64)
    warm = KronConv2d.from_dense(dense, n=2, warm_start=True)
    assert warm.terms == 2 and 0 < warm.warm_start_error < 1
    rel = float(((warm.weight - dense.weight).norm() / dense.weight.norm()).detach())
    assert warm.warm_start_error == pytest.approx(rel, rel=1e-8)
    cold = KronConv2d.from_dense(dense, n=2)
    assert cold.warm_start_error is None and torch.equal(cold.bias, dense.bias)
    assert cold.F.dtype == torch.float64 and not torch.allclose(cold.weight, dense.weight)
    with pytest.raises(TypeError, match="expects a Conv2d, got Linear"):
        KronConv2d.from_dense(nn.Linear(4, 4), n=2)


def test_from_dense_fixed_algebra_projects_F():
    dense = nn.Linear(8, 12, dtype=torch.float64)
    layer = KronLinear.from_dense(dense, n=4, algebra="quaternion", warm_start=True)
    rel = float(((layer.weight - dense.weight).norm() / dense.weight.norm()).detach())
    assert layer.warm_start_error == pytest.approx(rel, rel=1e-8) and 0 < rel < 1
    # a weight that already is a quaternion product is recovered exactly
    with torch.no_grad():
        dense.weight.copy_(layer.weight * 2)
    exact = KronLinear.from_dense(dense, n=4, algebra="quaternion", warm_start=True)
    assert exact.warm_start_error < 1e-12
    torch.testing.assert_close(exact.F, 2 * layer.F.detach())


def test_from_dense_copies_every_setting():
    conv = nn.Conv2d(4, 6, (3, 2), padding="same", dilation=(1, 2), padding_mode="circular", bias=False)
    k = KronConv2d.from_dense(conv, n=2)
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
                 "_reversed_padding_repeated_twice"):
        assert getattr(k, attr) == getattr(conv, attr), attr
    assert k.bias is None and k.to_dense().bias is None
    convt = nn.ConvTranspose2d(4, 6, 3, stride=3, padding=1, output_padding=2, dilation=1)
    kt = KronConvTranspose2d.from_dense(convt, n=2)
    assert kt.output_padding == (2, 2) and kt.stride == (3, 3) and kt.padding == (1, 1)
    x = torch.randn(1, 4, 5, 5)
    assert kt(x).shape == convt(x).shape
    assert kt(x, output_size=[15, 15]).shape == convt(x, output_size=[15, 15]).shape


@pytest.mark.parametrize("kind", ["linear", "conv", "convT"])
def test_bias_is_always_applied(kind):
    layer = {
        "linear": lambda: KronLinear(4, 6, n=2),
        "conv": lambda: KronConv2d(4, 6, 3, padding=1, n=2),
        "convT": lambda: KronConvTranspose2d(4, 6, 3, n=2),
    }[kind]()
    with torch.no_grad():
        layer.F.zero_()
        layer.bias.copy_(torch.arange(6.0) + 1)
    x = torch.randn(2, 4, 5, 5) if kind != "linear" else torch.randn(2, 4)
    y = layer(x)
    expect = (torch.arange(6.0) + 1).view(1, 6, *([1] * (y.dim() - 2)))
    torch.testing.assert_close(y, expect.expand_as(y))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", "valid", 1])
def test_padding_and_padding_mode_match_torch(padding, padding_mode):
    layer = KronConv2d(4, 6, (3, 4), padding=padding, padding_mode=padding_mode, n=2, dtype=torch.float64)
    dense = layer.to_dense()
    assert dense.padding_mode == padding_mode and dense.padding == layer.padding
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, dense(x))
    if padding == "same":
        assert y.shape[-2:] == x.shape[-2:]


def test_bad_inputs_have_clear_messages():
    with pytest.raises(ValueError, match="n must be an integer >= 2, got n=1"):
        KronLinear(4, 4, n=1)
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        KronConv2d(4, 4, 3, n=2.0)
    with pytest.raises(ValueError, match=r"KronConv2d\(in_channels=3, out_channels=8, groups=1\): "
                                         r"in_channels/groups=3 not divisible by n=2"):
        KronConv2d(3, 8, 3, n=2)
    with pytest.raises(ValueError, match=r"in_channels=6 and out_channels/groups=3 not divisible by n=4"):
        KronConvTranspose2d(6, 6, 3, groups=2, n=4)
    with pytest.raises(ValueError, match=r"out_features=5 not divisible by n=2"):
        KronLinear(4, 5)
    for terms in (0, 10, 1.5):
        with pytest.raises(ValueError, match=r"terms must be an integer in 1..n²=9 for n=3"):
            KronConv1d(6, 6, 3, n=3, terms=terms)
    with pytest.raises(ValueError, match="algebra 'complex' requires n=2, got n=4"):
        KronConv3d(8, 8, 1, n=4, algebra="complex")
    with pytest.raises(ValueError, match="algebra 'quaternion' has exactly 4 terms"):
        KronLinear(8, 8, n=4, terms=2, algebra="quaternion")
    with pytest.raises(ValueError, match="unknown algebra"):
        KronLinear(8, 8, algebra="octonion")
    with pytest.raises(ValueError, match="groups"):  # torch's own argument checks still apply
        KronConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match=r"out=6 not divisible by n=4"):
        kron_param_count(6, 8, (3,), 4, 4, True)


def test_kron_layer_for_and_config():
    assert set(KRON_LAYER_FOR) == {nn.Linear, *CONV.values(), *CONVT.values()}
    for torch_cls, kron_cls in KRON_LAYER_FOR.items():
        assert issubclass(kron_cls, torch_cls)
    k = KronConv1d(4, 4, 3, n=2, terms=3)
    assert k.kron_config() == {"n": 2, "terms": 3, "algebra": "learned"}
    assert k.A.shape == (3, 2, 2) and k.F.shape == (3, 2, 2, 3) and isinstance(k.A, nn.Parameter)
    text = repr(KronConv2d(8, 16, 3, padding=1, n=4, algebra="quaternion"))
    for part in ("8, 16, kernel_size=(3, 3)", "padding=(1, 1)", "n=4", "terms=4", "algebra='quaternion'",
                 f"params={4 * 4 * 2 * 9 + 16}/{16 * 8 * 9 + 16}"):
        assert part in text, part


def test_device_and_dtype_arguments():
    k = KronConvTranspose3d(4, 4, 2, device="cpu", dtype=torch.float64, n=2)
    assert all(t.dtype == torch.float64 for t in k.state_dict().values())
    assert k(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)).dtype == torch.float64
    m = KronConv2d(4, 4, 3, device="meta", n=2)
    assert m.F.is_meta and m.weight.is_meta


# ---- caching ------------------------------------------------------------------------------------


def fresh_weight(layer):
    return kron_weight(layer.A.detach(), layer.F.detach())


def test_eval_cache_is_used_and_never_stale():
    torch.manual_seed(0)
    layer = KronConv2d(4, 4, 3, padding=1, n=2)
    x = torch.randn(1, 4, 6, 6)
    layer.eval()
    with torch.no_grad():
        w1 = layer.weight
        assert layer.weight is w1  # cached
    assert layer.weight is not w1 and layer.weight.requires_grad  # grad enabled: recomputed

    # optimizer step
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, fresh_weight(layer), rtol=0, atol=0)
        assert not torch.equal(layer.weight, w1)
        # manual in-place edit of a factor
        w2 = layer.weight
        layer.F.mul_(-1)
        torch.testing.assert_close(layer.weight, -w2, rtol=0, atol=0)
        # load_state_dict
        other = KronConv2d(4, 4, 3, padding=1, n=2)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer.weight, other.weight, rtol=0, atol=0)
        # in-place edit of the returned (cached) tensor itself
        layer.weight.zero_()
        torch.testing.assert_close(layer.weight, fresh_weight(layer), rtol=0, atol=0)
        # replaced parameter
        layer.F = nn.Parameter(torch.randn_like(layer.F))
        torch.testing.assert_close(layer.weight, fresh_weight(layer), rtol=0, atol=0)
        # .data edits bypass version counters: documented, and reset_weight_cache() handles them
        layer.A.data.mul_(3)
        layer.reset_weight_cache()
        torch.testing.assert_close(layer.weight, fresh_weight(layer), rtol=0, atol=0)
        # dtype change
        layer.to(torch.float64)
        assert layer.weight.dtype == torch.float64
        torch.testing.assert_close(layer(x.double()), layer.to_dense()(x.double()))
    with torch.inference_mode():  # the most common eval context: cached too, and still tracked
        w3 = layer.weight
        assert layer.weight is w3
        layer.F.add_(1)
        torch.testing.assert_close(layer.weight, fresh_weight(layer), rtol=0, atol=0)
    layer.train()
    assert layer._weight_cache is None


# ---- integration with torch tooling -------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_deepcopy_state_dict_roundtrip_to_float64_and_trace():
    torch.manual_seed(0)
    layer = KronConv2d(4, 6, 3, padding=1, n=2, terms=3)
    x = torch.randn(2, 4, 5, 5)
    y = layer(x)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x), y)
    twin.F.data.add_(1)
    torch.testing.assert_close(layer(x), y)  # the copy owns its factors

    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = KronConv2d(4, 6, 3, padding=1, n=2, terms=3)
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x), y)
    with pytest.raises(RuntimeError, match="weight"):
        other.load_state_dict(nn.Conv2d(4, 6, 3).state_dict())

    layer64 = copy.deepcopy(layer).to(torch.float64)
    assert layer64.F.dtype == layer64.weight.dtype == torch.float64
    torch.testing.assert_close(layer64(x.double()), y.double(), rtol=1e-5, atol=1e-6)

    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), y)
    with torch.no_grad():
        layer.F.mul_(2)
    torch.testing.assert_close(traced(x), layer(x))  # the trace reads the factors, not a frozen weight


def test_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(KronConv2d(4, 4, 3, padding=1, n=2), nn.ReLU(), KronConvTranspose2d(4, 2, 2, stride=2, n=2))
    x = torch.randn(2, 4, 6, 6)
    compiled = torch.compile(model, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert model[0].F.grad is not None and model[0].A.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
