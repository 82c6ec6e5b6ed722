"""kronify.convert and ConversionReport: selection, overrides, strictness, sharing, hooks, safety on
error, torch integration (DDP, compile), report contents and FLOPs."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kronify
from kronify import cpu_kernel, kron_param_count
from kronify.analysis import count_flops
from kronify.convert import is_kron
from kronify.parametrization import kron_parametrizations
from kronify.patterns import name_matches


def kron_of(layer: nn.Module, name: str = "weight"):
    """The KronParametrization of layer.<name>."""
    return layer.parametrizations[name][0]


def factor(layer: nn.Module, name: str = "weight") -> torch.Tensor:
    """The F factor of layer.<name> (learned algebra)."""
    return layer.parametrizations[name].original1


class Net(nn.Module):
    """A small conv + MLP model with a custom method and one layer that does not factor by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # in_channels 3: not divisible by 2
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1))
        self.head = nn.ModuleDict({"fc1": nn.Linear(16, 12), "fc2": nn.Linear(12, 6)})

    def forward(self, x):
        x = self.body(self.stem(x)).mean((2, 3))
        return self.head["fc2"](torch.relu(self.head["fc1"](x)))

    def describe(self) -> str:
        return "net"


def snapshot(model: nn.Module):
    """Module identities and a copy of the state dict, to check that a model was left unchanged."""
    return ([(name, id(m)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model: nn.Module, snap) -> None:
    mods, state = snap
    assert [(name, id(m)) for name, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert not any(is_kron(m) for m in model.modules())


def x_net() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6)


# ---- patterns -------------------------------------------------------------------------------------
def test_name_matching_rules():
    assert name_matches("head.fc1", "fc1") and name_matches("head.fc1", "head.fc1")
    assert not name_matches("head.myfc1", "fc1") and not name_matches("head.fc1", "head")
    assert name_matches("body.0", "re:body\\.\\d") and not name_matches("xbody.0", "re:body\\.\\d")


def test_include_exclude_and_exclude_wins():
    torch.manual_seed(0)
    rep = kronify.convert(Net(), include=["fc1", "re:body\\..*"], exclude=["body.2"])
    assert set(rep.converted) == {"head.fc1", "body.0"}
    assert rep.skipped["body.2"] == "excluded by 'body.2'"
    assert rep.skipped["head.fc2"] == "not matched by include"
    assert is_kron(rep.model.head["fc1"]) and type(rep.model.head["fc2"]) is nn.Linear


def test_overrides_by_name_regex_type_and_none():
    rep = kronify.convert(
        Net(), n=2,
        overrides={nn.Linear: {"terms": 1}, "fc2": {"n": 3, "terms": 2}, "re:body\\.2": None, "body.0": {"n": 4}},
    )
    rows = {r.name: r for r in rep.rows}
    assert (rows["head.fc1"].n, rows["head.fc1"].terms) == (2, 1)  # type override
    assert (rows["head.fc2"].n, rows["head.fc2"].terms) == (3, 2)  # name key applied after type key
    assert (rows["body.0"].n, rows["body.0"].terms) == (4, 4)  # per-layer n, default terms = that n
    assert rows["body.2"].status == "skipped" and "None" in rows["body.2"].reason
    m = rep.model
    assert kron_of(m.head["fc2"]).config() == {"n": 3, "terms": 2, "algebra": "learned"}
    assert kron_of(m.body[0]).config() == {"n": 4, "terms": 4, "algebra": "learned"}


def test_fixed_algebra_override():
    rep = kronify.convert(Net(), overrides={"body.0": {"algebra": "complex"}})
    assert kron_of(rep.model.body[0]).algebra == "complex"
    assert not any(name.endswith(".A") for name, _ in rep.model.named_parameters())
    assert "body.0.parametrizations.weight.0.A" in dict(rep.model.named_buffers())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=1), "n must be an integer >= 2"),
        (dict(n=2.0), "n must be an integer >= 2"),
        (dict(n=True), "n must be an integer >= 2"),
        (dict(n=2, terms=5), "terms must be an integer in 1..n²=4"),
        (dict(n=2, terms=0), "terms must be an integer in 1..n²=4"),
        (dict(n=4, terms=9, overrides={"fc1": {"n": 2}}), r"overrides\['fc1'\].*terms must be"),
        (dict(overrides={"fc1": {"nn": 2, "rank": 1}}), r"unknown key\(s\) \['nn', 'rank'\]; valid keys are \['n', 'terms', 'algebra'\]"),
        (dict(overrides={"fc1": 3}), "must be a dict or None"),
        (dict(algebra="octonion"), "unknown algebra"),
        (dict(n=3, algebra="complex"), "requires n=2"),
        (dict(include=[3]), "patterns must be non-empty strings"),
        (dict(exclude=["re:("]), "invalid regex"),
        (dict(include=["nothing_like_this"]), "nothing to convert.*include pattern 'nothing_like_this'"),
        (dict(exclude=["re:.*"]), "nothing to convert"),
        (dict(n=5), "nothing to convert"),  # no layer divisible by 5
    ],
)
def test_bad_arguments_raise_and_leave_model_unchanged(kwargs, match):
    model = Net()
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError), match=match):
            kronify.convert(model, **kwargs)
    assert_unchanged(model, snap)


def test_unmatched_patterns_warn_naming_them():
    with pytest.warns(UserWarning) as record:
        rep = kronify.convert(Net(), exclude=["no_such_layer"], overrides={"re:zzz.*": {"terms": 1}, nn.Conv3d: None})
    text = " ".join(str(w.message) for w in record)
    assert "'no_such_layer'" in text and "'re:zzz.*'" in text and "Conv3d" in text
    assert rep.converted


def test_strict_lists_every_unconvertible_layer_and_leaves_model_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1), nn.Linear(8, 5))
    snap = snapshot(model)
    with pytest.raises(ValueError) as err:
        kronify.convert(model, strict=True)
    msg = str(err.value)
    assert "3 selected layer(s)" in msg
    assert "0 (in_channels/groups=3 not divisible by n=2)" in msg
    assert "1 (depthwise" in msg and "3 (out_features=5 not divisible by n=2)" in msg
    assert_unchanged(model, snap)
    rep = kronify.convert(model)  # not strict: the same layers are skipped with their reasons
    assert rep.converted == ["2"] and set(rep.skipped) == {"0", "1", "3"}
    assert rep.skipped["1"] == "depthwise, in_channels/groups=1 not divisible by n=2"


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_unexpected_error_while_applying_names_the_converted_layers_and_a_second_call_finishes(monkeypatch, error):
    """Layer by layer, each dense weight is freed once its layer is converted, so an unexpected failure cannot
    undo the layers before it: they stay converted, the failing one and the rest stay exactly as they were, the
    error says which, and converting again with the same settings gives what one call gives."""
    torch.manual_seed(0)
    model, reference = Net(), None
    reference = copy.deepcopy(model)
    kronify.convert(reference, warm_start=True)
    snap = snapshot(model)
    module = sys.modules["kronify.apply"]
    original, calls = module._install, []

    def failing(fit, undo):  # the 4th weight (head.fc2) fails after 3 layers were converted
        calls.append(fit)
        if len(calls) == 4:
            raise error
        return original(fit, undo)

    monkeypatch.setattr(module, "_install", failing)
    with pytest.raises(type(error)) as err:
        kronify.convert(model, warm_start=True)
    msg = str(err.value) if isinstance(error, Exception) else "\n".join(err.value.__notes__)
    assert "converting 'head.fc2' (Linear) failed" in msg
    assert "3 layer(s) are Kronecker layers ('body.0', 'body.2', 'head.fc1'), 1 are unchanged ('head.fc2')" in msg
    if isinstance(error, Exception):
        assert isinstance(err.value, kronify.apply.PartialConversionError)
        assert err.value.converted == ["body.0", "body.2", "head.fc1"] and err.value.remaining == ["head.fc2"]
    assert [is_kron(m) for m in (model.body[0], model.body[2], model.head["fc1"], model.head["fc2"])] == \
        [True, True, True, False]
    assert torch.equal(model.head["fc2"].weight, snap[1]["head.fc2.weight"])
    assert type(model.head["fc2"]) is nn.Linear and not model.head["fc2"]._forward_hooks
    monkeypatch.setattr(module, "_install", original)
    rep = kronify.convert(model, warm_start=True)
    assert rep.converted == ["head.fc2"]
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_bad_input_fails_before_any_layer_changes():
    model = Net()
    with torch.no_grad():
        model.head["fc2"].weight[1, 2] = float("inf")  # (nan would not compare equal to itself)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"inf or nan entries cannot be converted: head.fc2 \(weight\)"):
        kronify.convert(model, warm_start=True)
    assert_unchanged(model, snap)


def test_inplace_false_leaves_input_untouched():
    model = Net()
    snap = snapshot(model)
    rep = kronify.convert(model, inplace=False, warm_start=True)
    assert_unchanged(model, snap)
    assert rep.model is not model and type(rep.model) is Net
    assert is_kron(rep.model.body[0]) and isinstance(rep.model.body[0], nn.Conv2d)


def test_model_keeps_class_methods_and_works_with_to_and_state_dict():
    model = Net()
    rep = kronify.convert(model, warm_start=True, terms=4)
    assert rep.model is model and type(model) is Net and model.describe() == "net"
    x = x_net()
    y = model(x)
    model.to(torch.float64)
    assert factor(model.head["fc1"]).dtype == torch.float64
    torch.testing.assert_close(model(x.double()).float(), y, rtol=1e-4, atol=1e-5)
    other = kronify.convert(Net().double(), terms=4).model
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x.double()), model(x.double()))


class Unrolled(nn.Module):
    """An unrolled network: one denoiser called at every iteration, plus an alias path and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.denoiser = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.alias = self.denoiser[0]
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        for _ in range(3):
            x = x + self.denoiser(x)
        return x


def test_shared_modules_converted_once_and_stay_shared():
    model = Unrolled()
    dense_params = sum(p.numel() for p in model.parameters())
    rep = kronify.convert(model)
    assert model.alias is model.denoiser[0] and is_kron(model.alias)
    names = [r.name for r in rep.rows]
    assert names.count("denoiser.0") == 1 and "alias" not in names
    rows = {r.name: r for r in rep.rows}
    assert "shared: also at alias" in rows["denoiser.0"].reason
    assert "called 3x by the traced forward" in rows["denoiser.2"].reason
    assert "not called by the traced forward" in rows["unused"].reason
    assert rep.params_before == dense_params
    assert rep.params_after == sum(p.numel() for p in model.parameters())
    assert rep.params_before - rep.params_after == sum(r.params_before - r.params_after for r in rep.rows)
    model(torch.randn(2, 8)).sum().backward()
    assert factor(model.denoiser[0]).grad is not None


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.bn(x)
        return self.a(x) if x.sum() > -1e9 else self.b(x)


def test_untraceable_model_falls_back_and_example_inputs_find_called_layers():
    rep = kronify.convert(Dynamic(), inplace=False)
    assert rep.traced is False and "TraceError" in rep.trace_error
    assert set(rep.converted) == {"a", "b"} and "named_modules" in str(rep)
    model = Dynamic()
    bn_state = copy.deepcopy(model.bn.state_dict())
    rep = kronify.convert(model, example_inputs=torch.randn(3, 4))
    assert rep.traced is False
    assert "not called by the forward on example_inputs" in {r.name: r for r in rep.rows}["b"].reason
    assert all(torch.equal(v, bn_state[k]) for k, v in model.bn.state_dict().items())  # BN stats restored


class WSConv2d(nn.Conv2d):
    """Weight-standardised conv (as timm's StdConv2d): its own forward transforms self.weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return Fn.conv2d(x, w, self.bias, self.stride, self.padding)


class TaggedLinear(nn.Linear):
    """A subclass that changes nothing about the computation."""


def test_subclasses_tied_weight_norm_and_already_kron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old_weight_norm = nn.utils.weight_norm(nn.Linear(4, 4))
    done = nn.Sequential(nn.Linear(4, 4))
    kronify.convert(done)
    model = nn.Sequential(WSConv2d(4, 4, 3), nn.Flatten(), TaggedLinear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4),
                          old_weight_norm, done[0], nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    model[4].weight = model[3].weight  # tied
    rep = kronify.convert(model, warm_start=True, terms=4)
    assert {"0", "2", "7"} <= set(rep.converted)
    assert isinstance(model[0], WSConv2d) and isinstance(model[2], TaggedLinear) and is_kron(model[2])
    assert "tied weights" in rep.skipped["3"] and "tied weights" in rep.skipped["4"]
    assert "not a parameter" in rep.skipped["5"]
    assert rep.skipped["6"] == "already a Kronecker layer"
    assert model[3].weight is model[4].weight


def test_subclass_forward_sees_the_kronecker_weight():
    """StdConv-like forward standardizes the Kronecker weight: same output as the dense layer holding W."""
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, 3)
    kronify.convert(nn.Sequential(conv))
    dense = WSConv2d(4, 6, 3)
    with torch.no_grad():
        dense.weight.copy_(conv.weight)
        dense.bias.copy_(conv.bias)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), dense(x))


def test_weight_under_another_parametrization_gets_kronecker_original():
    """weight_norm (parametrize) keeps g and its own forward; its direction v becomes the Kronecker sum."""
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y = layer(x)
    kronify.convert(nn.Sequential(layer), warm_start=True, terms=4)
    plist = layer.parametrizations.weight
    assert is_kron(layer) and isinstance(plist.parametrizations.original1[0], kronify.KronParametrization)
    torch.testing.assert_close(layer(x), y)  # exact at terms = n²
    v = plist.original1
    g = plist.original0
    torch.testing.assert_close(layer.weight, g * v / v.norm(dim=1, keepdim=True))
    merged = kronify.merge(nn.Sequential(layer))[0]
    assert not is_kron(merged) and torch.allclose(merged(x), y)


def test_hooks_stay_on_the_layer():
    model = Net()
    fc1 = model.head["fc1"]
    seen = []
    h1 = fc1.register_forward_hook(lambda m, i, o: seen.append(("fwd", m is fc1)))
    fc1.register_forward_pre_hook(lambda m, i: seen.append(("pre", m is fc1)))
    model.register_forward_hook(lambda m, i, o: seen.append(("model", type(m).__name__)))
    kronify.convert(model)
    assert model.head["fc1"] is fc1 and is_kron(fc1)
    model(x_net())
    assert seen == [("pre", True), ("fwd", True), ("model", "Net")]
    h1.remove()  # the user's handle still controls the hook
    seen.clear()
    model(x_net())
    assert seen == [("pre", True), ("model", "Net")]


def test_training_mode_and_frozen_layers_are_kept():
    model = Net().train()
    model.head.eval()
    model.body[0].requires_grad_(False)
    kronify.convert(model)
    assert model.body[2].training and not model.head["fc1"].training
    assert not any(p.requires_grad for p in model.body[0].parameters())
    assert all(p.requires_grad for p in model.body[2].parameters())


def test_frozen_ness_carries_per_tensor():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)  # frozen weight, trainable bias
    model[1].bias.requires_grad_(False)  # trainable weight, frozen bias
    kronify.convert(model)
    w0 = model[0].parametrizations.weight
    assert not w0.original0.requires_grad and not w0.original1.requires_grad and model[0].bias.requires_grad
    w1 = model[1].parametrizations.weight
    assert w1.original0.requires_grad and w1.original1.requires_grad and not model[1].bias.requires_grad
    merged = kronify.merge(model)
    assert not merged[0].weight.requires_grad and merged[1].weight.requires_grad


def test_ddp_single_process_gloo(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = kronify.convert(Net()).model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        before = factor(model.head["fc1"]).detach().clone()
        ddp(x_net()).square().mean().backward()
        opt.step()
        assert not torch.equal(before, factor(model.head["fc1"]))
    finally:
        dist.destroy_process_group()


def test_torch_compile_eager_backend():
    torch.manual_seed(0)
    model = kronify.convert(Net()).model
    x = x_net()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert factor(model.body[0]).grad is not None


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="inductor needs a C compiler on CPU")
def test_torch_compile_inductor_train_and_eval():
    """The default backend (inductor codegen), on 'same' padding, ConvTranspose output_padding and Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding="same"), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), nn.Flatten(), nn.Linear(4 * 12 * 12, 6),
    )
    rep = kronify.convert(model, n=2)
    assert rep.converted == ["0", "2", "4"]
    x = torch.randn(2, 4, 6, 6)
    compiled = torch.compile(model)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        factor(model[4]).mul_(2)  # a parameter update must reach the compiled graph
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


# ---- the report ------------------------------------------------------------------------------------
def test_report_fields_table_and_json_round_trip():
    model = Net()
    before = sum(p.numel() for p in model.parameters())
    rep = kronify.convert(model, warm_start=True)
    assert rep.params_before == before and rep.params_after == sum(p.numel() for p in model.parameters())
    assert rep.traced is True and rep.trace_error is None and rep.model is model
    assert rep.converted == ["body.0", "body.2", "head.fc1", "head.fc2"]
    assert rep.skipped == {"stem": "in_channels/groups=3 not divisible by n=2"}
    row = rep.rows[1]
    assert (row.name, row.kind, row.shape, row.n, row.terms, row.status) == ("body.0", "Conv2d", (8, 8, 3, 3), 2, 2,
                                                                             "converted")
    assert row.params_before == 8 * 8 * 9 + 8
    assert row.params_after == 2 * 2 * 2 + 2 * 4 * 4 * 9 + 8 == kron_param_count((8, 8, 3, 3), 2, 2) + 8
    assert 0 < row.warm_start_error < 1
    text = str(rep)
    assert all(name in text for name in ["stem", "body.0", "head.fc2", "skipped: in_channels/groups=3"])
    assert f"{before:,}" in text and f"{rep.params_after:,}" in text and f"x{rep.ratio:.3f}" in text
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["rows"][1]["shape"] == [8, 8, 3, 3] and d["skipped"] == rep.skipped
    assert d["params_before"] == before and d["traced"] is True


def test_flops_dense_equals_converted_and_rebuild_is_separate():
    from torch.utils.flop_counter import FlopCounterMode

    dense = Net()
    x = x_net()
    with FlopCounterMode(display=False) as counter:
        dense(x)
    rep = kronify.convert(copy.deepcopy(dense), warm_start=True)
    rep.model.train()
    flops = count_flops(rep.model, x)
    assert flops["forward"] == counter.get_total_flops() == count_flops(dense, x)["forward"]
    # the rebuild counts as the composite Σ A⊗F (one matmul per layer) counts under FlopCounterMode (the CPU
    # kernel's C++ loops are invisible to the counter)
    kron = [p for _, _, _, p in kron_parametrizations(rep.model)]
    with FlopCounterMode(display=False) as build, cpu_kernel.disabled():
        for _, owner, _, p in kron_parametrizations(rep.model):
            p.build(owner.parametrizations.weight.original0, owner.parametrizations.weight.original1)
    assert len(kron) > 1 and flops["weight_rebuild"] == build.get_total_flops() > 0
    assert rep.model.training and rep.model.head["fc1"].training  # modes restored
    assert all(p._cache is None for p in kron)  # no dense weight left cached in train mode


# ---- property test: per-layer counts add up --------------------------------------------------------
@st.composite
def stacks(draw):
    """(n, random conv stack + pooled MLP, {layer name: expected Kron parameter count or None})."""
    n = draw(st.sampled_from([2, 3, 4]))
    layers, expected = [], {}
    ch = cin = draw(st.sampled_from([n, 2 * n, n + 1]))
    for i in range(draw(st.integers(0, 3))):
        out, k, bias = draw(st.sampled_from([n, 2 * n, 3, 5])), draw(st.integers(1, 3)), draw(st.booleans())
        groups = draw(st.sampled_from([g for g in (1, 2) if ch % g == 0 and out % g == 0]))
        layers.append(nn.Conv2d(ch, out, k, padding=k // 2, groups=groups, bias=bias))
        ok = out % n == 0 and (ch // groups) % n == 0 and not (groups > 1 and groups == ch)
        expected[str(len(layers) - 1)] = kron_param_count((out, ch // groups, k, k), n, n) + out * bias if ok else None
        ch = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for i in range(draw(st.integers(1, 3))):
        out, bias = draw(st.sampled_from([n, 3 * n, 5])), draw(st.booleans())
        layers.append(nn.Linear(ch, out, bias=bias))
        ok = out % n == 0 and ch % n == 0
        expected[str(len(layers) - 1)] = n**3 + out * ch // n + out * bias if ok else None
        ch = out
    return n, cin, nn.Sequential(*layers), expected


@settings(max_examples=25, deadline=None)
@given(spec=stacks())
def test_param_totals_equal_the_per_layer_formula(spec):
    n, cin, model, expected = spec
    before = sum(p.numel() for p in model.parameters())
    if all(v is None for v in expected.values()):
        with pytest.raises(ValueError, match="nothing to convert"):
            kronify.convert(model, n)
        return
    rep = kronify.convert(model, n)
    rows = {r.name: r for r in rep.rows}
    for name, count in expected.items():
        assert rows[name].status == ("converted" if count is not None else "skipped")
        assert rows[name].params_after == (count if count is not None else rows[name].params_before)
    assert rep.params_before == before
    assert rep.params_after == before - sum(r.params_before - r.params_after for r in rep.rows)
    assert rep.params_after == sum(p.numel() for p in model.parameters())
    assert model(torch.randn(2, cin, 4, 4)).isfinite().all()


def test_lazy_layers_are_skipped_with_a_reason():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 4))
    rep = kronify.convert(model)
    assert rep.skipped == {"0": "uninitialized lazy module"} and rep.converted == ["2"]
