"""convert(..., warm_start=True, calibration=batches): every converted layer fitted to the inputs it sees.

Each layer's output error is measured independently of the library's own bookkeeping: the inputs a layer
receives are captured with forward pre-hooks, and the dense, the calibrated and the weight-only (plain warm
start) versions of that layer are all called on those same inputs. Inputs have a fixed structure across
batches (low rank, smooth, an outlier channel), so that fitting to them must pay off on new batches.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import kronify
from kronify import CalibrationConfig, KronConfig
from kronify.calibration.inputs import Moments
from kronify.convert import is_kron
from kronify.parametrization import kron_parametrizations

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


# ---- structured inputs -----------------------------------------------------------------------------------
class Source:
    """Batches from one fixed distribution: a few latent factors mixed by fixed matrices, a small noise floor
    and one outlier channel. `kind` "rows" gives (B, *lead, d) rows; "signal1d"/"signal2d" give smooth
    (B, C, L) / (B, C, H, W) signals whose channels are mixtures of `rank` smooth latent fields."""

    def __init__(self, kind: str, d: int, *size: int, rank: int = 3, seed: int = 0, structured: bool = True):
        self.kind, self.d, self.size, self.rank, self.structured = kind, d, size, rank, structured
        self.g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(rank, d, generator=self.g)

    def batch(self, B: int, *lead: int) -> torch.Tensor:
        g = self.g
        if not self.structured:
            return torch.randn(B, *lead, self.d, *self.size, generator=g)
        if self.kind == "rows":
            x = torch.randn(B, *lead, self.rank, generator=g) @ self.mix
            x = x + 0.05 * torch.randn(x.shape, generator=g)
            x[..., 0] *= 8  # an outlier channel
            return x
        dims = len(self.size)
        z = torch.randn(B * self.rank, 1, *[s + 4 for s in self.size], generator=g)
        kernel = torch.ones(1, 1, *[5] * dims) / 5 ** (dims / 2)
        z = (Fn.conv1d if dims == 1 else Fn.conv2d)(z, kernel).reshape(B, self.rank, -1)
        x = torch.einsum("brs,rc->bcs", z, self.mix).reshape(B, self.d, *self.size)
        return x + 0.05 * torch.randn(x.shape, generator=g)

    def batches(self, count: int, B: int, *lead: int) -> list[torch.Tensor]:
        return [self.batch(B, *lead) for _ in range(count)]


# ---- models ----------------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def conv1d_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 8, 3, stride=2, dilation=2, padding=2), nn.ReLU(),
                         nn.Conv1d(8, 8, 4, padding="same", padding_mode="reflect"))


def conv2d_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding="same", dilation=2, padding_mode="reflect"), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 2, stride=2))


def hf_conv1d_net() -> nn.Module:
    return nn.Sequential(Conv1D(32, 16), nn.GELU(), Conv1D(16, 32))  # GPT-2 style: Conv1D(nf=out, nx=in)


class Attention(nn.Module):
    """Linear -> self-attention (nn.MultiheadAttention) -> Linear, batch-first or sequence-first."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.out = nn.Linear(16, 8)

    def forward(self, x):  # x: (B, L, 8)
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(a if self.batch_first else a.transpose(0, 1))


CASES = {
    "linear": (mlp, lambda s: Source("rows", 16, seed=s), lambda src: src.batch(32)),
    "conv1d": (conv1d_net, lambda s: Source("signal1d", 4, 32, rank=2, seed=s), lambda src: src.batch(8)),
    "conv2d+convtranspose2d": (conv2d_net, lambda s: Source("signal2d", 4, 12, 12, rank=2, seed=s),
                               lambda src: src.batch(4)),
    "hf_conv1d": (hf_conv1d_net, lambda s: Source("rows", 16, seed=s), lambda src: src.batch(4, 8)),
    "mha_batch_first": (lambda: Attention(True), lambda s: Source("rows", 8, seed=s), lambda src: src.batch(4, 12)),
    "mha_seq_first": (lambda: Attention(False), lambda s: Source("rows", 8, seed=s), lambda src: src.batch(4, 12)),
}


def build(case: str, seed: int = 0, structured: bool = True):
    make_model, make_source, draw = CASES[case]
    torch.manual_seed(seed)
    model = make_model().eval()
    src = make_source(seed)
    src.structured = structured
    return model, (lambda count, size=1: [torch.cat([draw(src) for _ in range(size)]) for _ in range(count)])


# ---- measuring layer outputs -----------------------------------------------------------------------------
def capture(model: nn.Module, names: list[str], batches: list) -> dict[str, list[tuple[tuple, dict]]]:
    """The (args, kwargs) every named layer of `model` is called with on `batches`."""
    modules = dict(model.named_modules())
    got: dict[str, list] = {name: [] for name in names}
    hooks = [modules[name].register_forward_pre_hook(
        lambda m, args, kwargs, name=name: got[name].append((args, dict(kwargs))), with_kwargs=True)
        for name in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(*b) if isinstance(b, tuple) else model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in hooks:
            h.remove()
    return got


def layer_output(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """What the layer's weight produces: its output, or for attention the q/k/v projections."""
    if isinstance(module, nn.MultiheadAttention):
        inputs = list(args) + [kwargs[k] for k in ("query", "key", "value") if k in kwargs]
        W, b = module.in_proj_weight, module.in_proj_bias
        return torch.cat([Fn.linear(x, w, c).flatten() for x, w, c in zip(inputs, W.chunk(3), b.chunk(3))])
    return module(*args, **kwargs)


def output_errors(dense: nn.Module, other: nn.Module, inputs: dict) -> dict[str, float]:
    """Relative output error of each layer of `other` against the same layer of `dense`, on the same inputs."""
    d, o = dict(dense.named_modules()), dict(other.named_modules())
    out = {}
    with torch.no_grad():
        for name, calls in inputs.items():
            num = den = 0.0
            for args, kwargs in calls:
                yd, yo = layer_output(d[name], args, kwargs), layer_output(o[name], args, kwargs)
                num += float((yo - yd).double().pow(2).sum())
                den += float(yd.double().pow(2).sum())
            out[name] = math.sqrt(num / den)
    return out


def called(model: nn.Module, names: list[str], batch) -> list[str]:
    got = capture(model, names, [batch])
    return [name for name in names if got[name]]


def snapshot(model: nn.Module):
    return ([(name, id(m), type(m), m.training) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_untouched(model: nn.Module, snap) -> None:
    mods, state = snap
    assert [(name, id(m), type(m), m.training) for name, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not any(is_kron(m) for m in model.modules())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hook left behind


def row(report, name: str):
    return next(r for r in report.rows if r.name == name)


# ---- output error of every layer kind --------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "parallel"])
def test_calibrated_layers_beat_the_weight_only_warm_start_on_new_inputs(case, sequential):
    model, draw = build(case)
    cal, new = draw(8), draw(4)
    report = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False,
                             calibration_config=CalibrationConfig(sequential=sequential))
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    assert report.converted == plain.converted and report.converted
    # sequential: each layer was fitted to what the calibrated layers before it produce; parallel: to the dense
    source = report.model if sequential else model
    names = called(source, report.converted, new[0])
    inputs = capture(source, names, new)
    calibrated, weight_only = output_errors(model, report.model, inputs), output_errors(model, plain.model, inputs)
    for name in names:
        assert calibrated[name] <= weight_only[name] + 1e-3, (name, calibrated[name], weight_only[name])
        assert calibrated[name] < 0.8 * weight_only[name], (name, calibrated[name], weight_only[name])
    # the model as a whole follows the dense one more closely too
    with torch.no_grad():
        y = torch.cat([model(x) for x in new])
        rel = lambda m: float((torch.cat([m(x) for x in new]) - y).norm() / y.norm())  # noqa: E731
        assert rel(report.model) < rel(plain.model)


@pytest.mark.parametrize("case", ["linear", "conv2d+convtranspose2d", "hf_conv1d"])
def test_unstructured_inputs_never_make_a_layer_worse_than_weight_only(case):
    model, draw = build(case, seed=1, structured=False)
    cal, new = draw(8, size=8), draw(4, size=8)  # enough rows that the sample metric is close to isotropic
    report = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False)
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    inputs = capture(report.model, report.converted, new)
    calibrated, weight_only = output_errors(model, report.model, inputs), output_errors(model, plain.model, inputs)
    for name in report.converted:
        assert calibrated[name] <= weight_only[name] * 1.02 + 1e-3, (name, calibrated[name], weight_only[name])


@pytest.mark.parametrize("case", ["linear", "conv1d", "conv2d+convtranspose2d", "hf_conv1d"])
def test_reported_errors_are_the_measured_errors_on_the_held_out_batches(case):
    """The held-out errors in the report are exact for these kinds (im2col patches, and for a kernel-2
    stride-2 ConvTranspose2d the channel metric): measure them on the last 2 of 8 batches (holdout 0.25)."""
    model, draw = build(case, seed=2)
    cal = draw(8)
    report = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False)
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    held = capture(report.model, report.converted, cal[6:])
    weight_only = output_errors(model, plain.model, held)
    dense = dict(model.named_modules())
    for name in report.converted:
        r = row(report, name)
        layer, ours = dense[name], dict(report.model.named_modules())[name]
        # the report's errors are relative to the weight's part of the output, W x (without the bias)
        bias_shape = [-1] + [1] * (len(layer.weight.shape) - 2) if isinstance(layer, nn.modules.conv._ConvNd) else [-1]
        with torch.no_grad():
            num2 = sum(float((layer_output(layer, a, k) - layer_output(ours, a, k)).double().pow(2).sum())
                       for a, k in held[name])
            wx2 = sum(float((layer_output(layer, a, k) - layer.bias.reshape(bias_shape)).double().pow(2).sum())
                      for a, k in held[name])
        assert r.output_error == pytest.approx(math.sqrt(num2 / wx2), rel=1e-3, abs=1e-6), name
        with torch.no_grad():
            y2 = sum(float(layer_output(dense[name], a, k).double().pow(2).sum()) for a, k in held[name])
        ratio = math.sqrt(y2 / wx2)  # output_errors() is relative to the whole output, bias included
        assert r.weight_fit_error == pytest.approx(weight_only[name] * ratio, rel=1e-3, abs=1e-6), name
        # warm_start_error is the kept fit's relative error in weight space
        Wd, Wc = layer.weight.detach().double(), ours.weight.detach().double()
        assert r.warm_start_error == pytest.approx(float((Wc - Wd).norm() / Wd.norm()), rel=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_report_rows_carry_the_fit_and_both_errors(case):
    model, draw = build(case)
    report = kronify.convert(model, n=2, warm_start=True, calibration=draw(4), inplace=False)
    assert report.converted
    for r in report.rows:
        if r.status != "converted":
            continue
        assert r.fit
        if r.fit.startswith("weight-only"):  # MultiheadAttention's out_proj: read by its forward, never called
            assert r.name.endswith("mha.out_proj") and "no calibration input" in r.fit
            assert r.output_error is None and r.weight_fit_error is None
            continue
        assert set(r.fit.split("/")) <= {"weight", "weight+bias", "kron", "kron+bias", "als", "als+bias"}
        assert 0 <= r.output_error <= r.weight_fit_error + 1e-9
        assert r.warm_start_error is not None and r.warm_start_error > 0
    text = str(report)
    header = text.splitlines()[0].split()
    assert {"out_err", "w_out_err", "fit"} <= set(header)
    for r in report.rows:
        if r.output_error is not None:
            assert f"{r.output_error:.3f}" in text and f"{r.weight_fit_error:.3f}" in text
    assert "out_err" not in str(kronify.convert(model, n=2, warm_start=True, inplace=False))
    json.dumps(report.to_dict())  # the new fields are JSON-safe


# ---- sequential / parallel, methods -------------------------------------------------------------------------
def factors(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    plist = dict(model.named_modules())[name].parametrizations.weight
    return plist.original0.detach(), plist.original1.detach()


def test_sequential_fits_each_layer_to_the_calibrated_layers_before_it_and_parallel_to_the_dense_ones():
    model, draw = build("linear")
    cal = draw(6)
    cfg = dict(holdout=0.0)
    seq = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False,
                          calibration_config=CalibrationConfig(**cfg))
    par = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False,
                          calibration_config=CalibrationConfig(sequential=False, **cfg))
    for report in (seq, par):
        assert report.config.calibration.sequential is (report is seq)
        for name in report.converted:
            assert 0 <= row(report, name).output_error <= row(report, name).weight_fit_error + 1e-9
    # the first layer sees the model inputs either way
    for a, b in zip(factors(seq.model, "0"), factors(par.model, "0")):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(factors(seq.model, "4")[1], factors(par.model, "4")[1], atol=1e-4)

    # layer 2 alone, calibrated on the inputs each mode should have given it, reproduces its factors
    def alone(inputs):
        layer = nn.Sequential(copy.deepcopy(model[2]))
        return kronify.convert(layer, n=2, warm_start=True, calibration=inputs, calibration_config=CalibrationConfig(
            **cfg)).model

    with torch.no_grad():
        dense_in = [torch.relu(model[0](x)) for x in cal]
        calibrated_in = [torch.relu(seq.model[0](x)) for x in cal]
    for mode, inputs in ((par, dense_in), (seq, calibrated_in)):
        for a, b in zip(factors(mode.model, "2"), factors(alone(inputs), "0")):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mode.model[2].bias, alone(inputs)[0].bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["linear", "conv2d+convtranspose2d", "mha_batch_first"])
def test_method_weight_reproduces_the_plain_warm_start(case):
    model, draw = build(case)
    report = kronify.convert(model, n=2, warm_start=True, calibration=draw(4), inplace=False,
                             calibration_config=CalibrationConfig(method="weight"))
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    built = {f"{o}.{t}": owner for o, owner, t, _ in kron_parametrizations(plain.model)}
    ours = {f"{o}.{t}": owner for o, owner, t, _ in kron_parametrizations(report.model)}
    assert built.keys() == ours.keys() and built
    with torch.no_grad():
        for key in built:
            tensor = key.rsplit(".", 1)[1]
            a, b = getattr(ours[key], tensor), getattr(built[key], tensor)
            if isinstance(ours[key], nn.ConvTranspose2d):  # fitted as the (out, in·k) matrix: same optimum
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a, b), key
    for k, v in plain.model.state_dict().items():
        if "parametrizations" not in k:  # biases untouched: no bias correction without a metric
            assert torch.equal(report.model.state_dict()[k], v), k
    assert all(r.fit in ("weight", None) or r.fit.startswith("weight-only") for r in report.rows)


@pytest.mark.parametrize("method", ["kron", "als"])
def test_methods_kron_and_als(method):
    model, draw = build("linear")
    cal, new = draw(8), draw(4)
    report = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False,
                             calibration_config=CalibrationConfig(method=method))
    assert report.config.calibration.method == method
    fits = [row(report, name).fit for name in report.converted]
    assert all(f.split("+")[0] in (("weight", "kron") if method == "kron" else ("weight", "kron", "als"))
               for f in fits)
    assert any(f.startswith(method) for f in fits)
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    inputs = capture(report.model, report.converted, new)
    calibrated, weight_only = output_errors(model, report.model, inputs), output_errors(model, plain.model, inputs)
    assert all(calibrated[n] < 0.8 * weight_only[n] for n in report.converted)


def test_fixed_algebra_keeps_its_a_and_fits_f_to_the_inputs():
    model, draw = build("linear")
    cal, new = draw(8), draw(4)
    report = kronify.convert(model, n=2, algebra="complex", warm_start=True, calibration=cal, inplace=False)
    plain = kronify.convert(model, n=2, algebra="complex", warm_start=True, inplace=False)
    for _, _, _, p in kron_parametrizations(report.model):
        torch.testing.assert_close(p.A, kronify.algebra.algebra_matrices("complex"))
    fits = [row(report, name).fit for name in report.converted]
    assert all(f.split("+")[0] in ("weight", "kron") for f in fits) and any(f.startswith("kron") for f in fits)
    inputs = capture(report.model, report.converted, new)
    calibrated, weight_only = output_errors(model, report.model, inputs), output_errors(model, plain.model, inputs)
    assert all(calibrated[n] < 0.8 * weight_only[n] for n in report.converted)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bias_correction_lowers_the_error_of_a_layer_fed_non_centred_inputs(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    with torch.no_grad():
        model[0].bias.fill_(2.0)  # layer "2" reads ReLU outputs with a mean of about 2
    src = Source("rows", 16, seed=seed, rank=8)
    cal, new = src.batches(8, 64), src.batches(4, 64)
    cfg = dict(sweeps=100)  # converged ALS: the centred fit plus the bias is the optimum with a free bias
    on = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False,
                         calibration_config=CalibrationConfig(**cfg))
    off = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False,
                          calibration_config=CalibrationConfig(bias_correction=False, **cfg))
    assert row(on, "2").fit.endswith("+bias") and "+bias" not in row(off, "2").fit
    assert torch.equal(off.model[2].bias, model[2].bias)
    for data in (cal, new):  # on the calibration inputs and on new ones, each fed to both versions
        inputs = capture(on.model, ["2"], data)
        e_on, e_off = output_errors(model, on.model, inputs), output_errors(model, off.model, inputs)
        assert e_on["2"] < e_off["2"]
    # the correction is (W - Ŵ)·mean(x) over the fit batches (the first 6 of 8)
    x = torch.cat([a[0] for a, _ in capture(on.model, ["2"], cal[:6])["2"]]).double()
    with torch.no_grad():
        E = model[2].weight.double() - on.model[2].weight.double()
        expected = model[2].bias.double() + E @ x.mean(0)
    torch.testing.assert_close(on.model[2].bias.double(), expected, rtol=1e-5, atol=1e-5)


# ---- statistics, skipped layers, batches ------------------------------------------------------------------
def test_statistics_accumulate_batch_by_batch():
    model, draw = build("linear")
    data = torch.cat(draw(2))  # 64 rows
    cfg = CalibrationConfig(holdout=0.0)
    one = kronify.convert(model, n=2, warm_start=True, calibration=[data], inplace=False, calibration_config=cfg)
    eight = kronify.convert(model, n=2, warm_start=True, calibration=list(data.split(8)), inplace=False,
                            calibration_config=cfg)
    assert one.converted == eight.converted
    for name in one.converted:
        assert row(one, name).fit == row(eight, name).fit
        assert row(one, name).output_error == pytest.approx(row(eight, name).output_error, rel=1e-4)
        for a, b in zip(factors(one.model, name), factors(eight.model, name)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        w1 = dict(one.model.named_modules())[name].weight.detach()
        w8 = dict(eight.model.named_modules())[name].weight.detach()
        assert float((w1 - w8).norm() / w1.norm()) < 1e-4
    # the accumulator itself
    X = torch.randn(64, 6)
    whole, parts = Moments(), Moments()
    whole.add(X)
    for part in X.split(8):
        parts.add(part)
    assert whole.N == parts.N == 64
    for a, b in zip(whole.metric(1, centred=True), parts.metric(1, centred=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_centred_metric_is_accurate_for_inputs_with_a_large_mean():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20000, 8, generator=g) * torch.linspace(0.5, 2, 8) + 300
    m = Moments()
    for part in X.split(1000):
        m.add(part)
    C, _ = m.metric(1, centred=True)
    ref = torch.cov(X.double().T, correction=0)
    assert float((C - ref).norm() / ref.norm()) < 1e-3


def test_calibration_does_not_depend_on_a_constant_input_offset():
    torch.manual_seed(0)
    src = Source("rows", 16, rank=6)
    cal, new = [0.1 * x for x in src.batches(8, 256)], [0.1 * x for x in src.batches(4, 256)]
    offset = 300.0
    layer = nn.Linear(16, 16)
    shifted = copy.deepcopy(layer)  # shifted(z) == layer(z + offset): the same layer seen from centred inputs
    with torch.no_grad():
        shifted.bias += layer.weight.sum(1) * offset
    with_offset = kronify.convert(nn.Sequential(layer), n=2, warm_start=True, inplace=False,
                                  calibration=[x + offset for x in cal]).model
    centred = kronify.convert(nn.Sequential(shifted), n=2, warm_start=True, inplace=False, calibration=cal).model
    with torch.no_grad():
        e_offset = sum(float((with_offset(x + offset) - layer(x + offset)).pow(2).sum()) for x in new) ** 0.5
        e_centred = sum(float((centred(x) - shifted(x)).pow(2).sum()) for x in new) ** 0.5
    assert e_offset <= 1.5 * e_centred


def test_grouped_conv_and_a_layer_never_called_keep_the_weight_only_fit_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.grouped(torch.relu(self.conv(x)))

    torch.manual_seed(0)
    model = Net().eval()
    src = Source("signal2d", 4, 8, 8, rank=2)
    report = kronify.convert(model, n=2, warm_start=True, calibration=src.batches(4, 2), inplace=False)
    assert set(report.converted) == {"conv", "grouped", "unused"}
    assert row(report, "grouped").fit.startswith("weight-only") and "grouped conv" in row(report, "grouped").fit
    assert row(report, "unused").fit.startswith("weight-only") and "no calibration input" in row(report, "unused").fit
    assert not row(report, "conv").fit.startswith("weight-only")
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    for name in ("grouped", "unused"):
        assert row(report, name).output_error is None
        assert torch.equal(getattr(report.model, name).weight, getattr(plain.model, name).weight)
        assert torch.equal(getattr(report.model, name).bias, getattr(plain.model, name).bias)


def test_an_endless_generator_is_read_for_max_batches_batches():
    model, draw = build("linear")
    src = Source("rows", 16)
    count = itertools.count()

    def endless():
        while True:
            next(count)
            yield src.batch(8)

    report = kronify.convert(model, n=2, warm_start=True, calibration=endless(), inplace=False,
                             calibration_config=CalibrationConfig(max_batches=5))
    assert next(count) == 5
    assert all(not row(report, n).fit.startswith("weight-only") for n in report.converted)


def test_a_large_holdout_still_leaves_batches_to_fit_on():
    model, draw = build("linear")
    report = kronify.convert(model, n=2, warm_start=True, calibration=draw(4), inplace=False,
                             calibration_config=CalibrationConfig(holdout=0.9))
    assert all(not row(report, n).fit.startswith("weight-only") for n in report.converted)


def test_a_layer_the_held_out_batches_never_reach_is_still_fitted():
    class Routed(nn.Module):  # like a mixture-of-experts expert that gets no tokens on some batches
        def __init__(self):
            super().__init__()
            self.shared, self.expert = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            y = self.shared(x)
            return self.expert(y) if x.shape[0] > 4 else y

    torch.manual_seed(0)
    src = Source("rows", 16)
    batches = src.batches(3, 8) + src.batches(1, 4)  # the last batch (held out) skips the expert
    report = kronify.convert(Routed().eval(), n=2, warm_start=True, calibration=batches, inplace=False)
    assert row(report, "expert").fit is not None


def test_dict_inputs_of_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=64)
    model = transformers.GPT2Model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 12), generator=g),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(4)]
    report = kronify.convert(model, n=2, warm_start=True, calibration=batches, inplace=False)
    conv1d = [r for r in report.rows if r.kind == "Conv1D"]
    assert len(conv1d) == 4 and all(r.status == "converted" for r in conv1d)
    for r in conv1d:
        assert not r.fit.startswith("weight-only"), r
        assert r.output_error <= r.weight_fit_error + 1e-9
    with torch.no_grad():
        out = report.model(**batches[0]).last_hidden_state
    assert out.shape == (2, 12, 16) and torch.isfinite(out).all()
    assert model.h[0].attn.c_attn.__class__.__name__ == "Conv1D"  # the user's model is not converted


def test_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 8)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    torch.manual_seed(0)
    model = Two().eval()
    sx, sy = Source("rows", 16, seed=1), Source("rows", 8, seed=2)
    batches = [(sx.batch(16), sy.batch(16)) for _ in range(4)]
    report = kronify.convert(model, n=2, warm_start=True, calibration=batches, inplace=False)
    assert all(not row(report, n).fit.startswith("weight-only") for n in ("a", "b"))
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    new = [(sx.batch(16), sy.batch(16)) for _ in range(2)]
    inputs = capture(model, ["a", "b"], new)
    calibrated, weight_only = output_errors(model, report.model, inputs), output_errors(model, plain.model, inputs)
    assert all(calibrated[n] < 0.8 * weight_only[n] for n in ("a", "b"))


def test_cross_attention_with_separate_projections_fits_each_to_its_own_input():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)

        def forward(self, q, k, v):
            return self.mha(q, key=k, value=v)[0]  # key and value as keyword inputs

    torch.manual_seed(0)
    model = Cross().eval()
    sources = Source("rows", 16, seed=1), Source("rows", 8, seed=2), Source("rows", 12, seed=3)
    draw = lambda: tuple(s.batch(4, 6) for s in sources)  # noqa: E731
    cal, new = [draw() for _ in range(8)], [draw() for _ in range(3)]
    report = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False)
    plain = kronify.convert(model, n=2, warm_start=True, inplace=False)
    assert not row(report, "mha").fit.startswith("weight-only")
    bias = model.mha.in_proj_bias.detach().chunk(3)
    with torch.no_grad():
        for i, tensor in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            dense = [Fn.linear(x[i], getattr(model.mha, tensor), bias[i]) for x in new]
            err = {}
            for key, m in (("calibrated", report.model.mha), ("weight_only", plain.model.mha)):
                b = m.in_proj_bias.chunk(3)[i]
                got = [Fn.linear(x[i], getattr(m, tensor), b) for x in new]
                err[key] = float(torch.cat([(g - d).flatten() for g, d in zip(got, dense)]).norm()
                                 / torch.cat([d.flatten() for d in dense]).norm())
            assert err["calibrated"] < 0.8 * err["weight_only"], (tensor, err)


# ---- bad input ------------------------------------------------------------------------------------------------
def bad_batches(src):
    return [src.batch(8), src.batch(8), torch.randn(8, 5), src.batch(8)]


@pytest.mark.parametrize("make_call, error, match", [
    (lambda m, s: dict(calibration=[]), ValueError, "batches are empty"),
    (lambda m, s: dict(calibration=iter([])), ValueError, "batches are empty"),
    (lambda m, s: dict(calibration=[torch.randn(8, 5)]), ValueError, "calibration batch 0"),
    (lambda m, s: dict(calibration=bad_batches(s)), ValueError, "calibration batch 2"),
    (lambda m, s: dict(calibration=bad_batches(s), calibration_config=CalibrationConfig(sequential=False)),
     ValueError, "calibration batch 2"),
    (lambda m, s: dict(calibration=[s.batch(8)], warm_start=False), ValueError, "warm_start=True"),
    (lambda m, s: dict(calibration=s.batch(8)), TypeError, "not a single Tensor"),
    (lambda m, s: dict(calibration=42), TypeError, "iterable of model inputs"),
], ids=["empty", "empty-iterator", "bad-first-batch", "bad-later-batch", "bad-later-batch-parallel",
        "no-warm-start", "single-tensor", "not-iterable"])
def test_bad_calibration_input_raises_and_leaves_the_model_untouched(make_call, error, match):
    model, _ = build("linear")
    src = Source("rows", 16)
    kwargs = {"warm_start": True, **make_call(model, src)}
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        kronify.convert(model, n=2, **kwargs)  # in place: everything done so far must be undone
    assert_untouched(model, snap)


@pytest.mark.parametrize("kwargs, match", [(dict(method="x"), "method"), (dict(holdout=1.0), "holdout"),
                                           (dict(holdout=-0.1), "holdout"), (dict(sweeps=-1), "sweeps"),
                                           (dict(max_batches=0), "max_batches"), (dict(damping=-1.0), "damping")])
def test_calibration_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        KronConfig.from_dict({"calibration": {**CalibrationConfig().__dict__, **kwargs}})


# ---- config, save / load, merge ------------------------------------------------------------------------------
def test_config_with_calibration_and_budget_round_trips_through_json():
    cfg = KronConfig(n=2, warm_start=True, budget=0.6,
                     calibration=CalibrationConfig(method="kron", sequential=False, sweeps=3, holdout=0.5,
                                                   bias_correction=False, damping=1e-3, max_dim=128, max_batches=7))
    again = KronConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.calibration, CalibrationConfig)
    assert KronConfig.from_json(KronConfig(budget=0.25).to_json()).budget == 0.25
    model, draw = build("linear")
    report = kronify.convert(model, n=2, warm_start=True, calibration=draw(2), inplace=False)
    assert report.config.calibration == CalibrationConfig()  # the defaults used are recorded
    assert KronConfig.from_json(report.config.to_json()) == report.config


def test_save_load_and_merge_of_a_calibrated_model(tmp_path):
    model, draw = build("conv2d+convtranspose2d")
    cal, new = draw(4), draw(2)
    report = kronify.convert(model, n=2, warm_start=True, calibration=cal, inplace=False)
    path = tmp_path / "calibrated.safetensors"
    kronify.save(report.model, path, config=report.config)
    record, _ = kronify.io.read_record(path)
    assert KronConfig.from_dict(record["config"]) == report.config
    base, _ = build("conv2d+convtranspose2d", seed=5)  # other weights: all must come from the file
    loaded = kronify.load(base, path)
    merged = kronify.merge(report.model, inplace=False)
    assert not any(is_kron(m) for m in merged.modules())
    with torch.no_grad():
        for x in new:
            y = report.model(x)
            assert torch.equal(loaded(x), y)
            torch.testing.assert_close(merged(x), y, rtol=1e-6, atol=1e-6)
        # the calibrated biases travel too: the weight-only model differs
        plain = kronify.convert(model, n=2, warm_start=True, inplace=False).model
        assert not torch.allclose(plain(new[0]), report.model(new[0]))
