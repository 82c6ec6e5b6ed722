"""KronMultiheadAttention: exact warm start, factors really used (slow and fast path), no dense
projection parameter, merge back, and nn.Transformer layers converted through kronify.convert."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kronify
from kronify import KronLinear
from kronify.layers.attention import KronMultiheadAttention

CONFIGS = {
    "packed": dict(embed_dim=16, num_heads=4),
    "batch_first": dict(embed_dim=16, num_heads=2, batch_first=True),
    "kdim_vdim": dict(embed_dim=16, num_heads=4, kdim=8, vdim=12),
    "no_bias_kv_zero_attn": dict(embed_dim=16, num_heads=4, bias=False, add_bias_kv=True, add_zero_attn=True),
}


def inputs(cfg, batch=2, tq=5, tk=7):
    e, kd, vd = cfg["embed_dim"], cfg.get("kdim") or cfg["embed_dim"], cfg.get("vdim") or cfg["embed_dim"]
    shape = (lambda t, d: (batch, t, d)) if cfg.get("batch_first") else (lambda t, d: (t, batch, d))
    g = torch.Generator().manual_seed(1)
    return (torch.randn(shape(tq, e), generator=g, dtype=torch.float64),
            torch.randn(shape(tk, kd), generator=g, dtype=torch.float64),
            torch.randn(shape(tk, vd), generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_warm_start_at_full_terms_is_exact_and_factors_are_used(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(**cfg, dtype=torch.float64)
    kron = KronMultiheadAttention.from_dense(dense, n=2, terms=4, warm_start=True)
    q, k, v = inputs(cfg)
    y, attn = dense(q, k, v)
    y2, attn2 = kron(q, k, v)
    torch.testing.assert_close(y2, y, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(attn2, attn, rtol=1e-9, atol=1e-10)
    assert kron.warm_start_error < 1e-9
    # no dense projection weight is a parameter; every projection weight is a Kronecker factorization
    names = {n for n, _ in kron.named_parameters()}
    assert not names & {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"}
    assert {"q_proj.F", "k_proj.F", "v_proj.F", "out_proj.F"} <= names
    # perturbing each factor changes the output
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        with torch.no_grad():
            getattr(kron, proj).F.add_(0.1)
        y3, _ = kron(q, k, v)
        assert not torch.allclose(y3, y2), proj
        y2 = y3
    y3.sum().backward()
    assert all(getattr(kron, p).F.grad is not None for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    # merge back: a plain nn.MultiheadAttention with the same outputs
    merged = kron.to_dense()
    assert type(merged) is nn.MultiheadAttention
    torch.testing.assert_close(merged(q, k, v)[0], kron(q, k, v)[0])


def test_fast_path_uses_the_factors(monkeypatch):
    cfg = CONFIGS["batch_first"]
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(**cfg).eval()
    kron = KronMultiheadAttention.from_dense(dense, n=2, terms=4, warm_start=True).eval()
    calls = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):
        calls.append(args[4])  # in_proj_weight
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = dense(x, x, x, need_weights=False)[0]
        y2 = kron(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
        assert len(calls) == 2  # both took torch's fast path
        kron.q_proj.F.mul_(2)
        y3 = kron(x, x, x, need_weights=False)[0]
    assert len(calls) == 3 and not torch.allclose(y3, y2)  # the cached weight did not go stale


def test_cold_start_matches_torch_init_scale_and_copies_biases():
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(64, 4, add_bias_kv=True)
    with torch.no_grad():
        dense.in_proj_bias.normal_()
    kron = KronMultiheadAttention.from_dense(dense, n=2)
    assert kron.warm_start_error is None and kron.n == 2 and kron.terms == 2
    ratio = kron.in_proj_weight.var() / dense.in_proj_weight.var()
    assert 0.8 < ratio < 1.25
    assert torch.equal(kron.in_proj_bias, dense.in_proj_bias) and torch.equal(kron.bias_k, dense.bias_k)
    assert kron.kron_config() == {"n": 2, "terms": 2, "algebra": "learned"}
    fresh = KronMultiheadAttention(64, 4, n=4, algebra="quaternion")
    assert fresh.out_proj.A.requires_grad is False and fresh.terms == 4


def test_convert_transformer_encoder_keeps_outputs_train_and_eval():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    y = model(x)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    rep = kronify.convert(model, n=2, terms=4, warm_start=True)
    kinds = {r.kind for r in rep.rows if r.status == "converted"}
    assert kinds == {"MultiheadAttention", "Linear"}
    assert isinstance(model.layers[0].self_attn, KronMultiheadAttention)
    assert isinstance(model.layers[0].self_attn.out_proj, KronLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_eval)  # eval: torch's fused encoder fast path
    model.train()
    torch.testing.assert_close(model(x), y)
    row = next(r for r in rep.rows if r.kind == "MultiheadAttention")
    assert row.shape == (16, 16, 16) and row.params_after > 0
    assert row.params_before == 4 * 16 * 16 + 4 * 16


def test_attention_with_indivisible_dims_is_skipped():
    model = nn.Sequential(nn.MultiheadAttention(12, 3, kdim=5), nn.Linear(4, 4))
    rep = kronify.convert(model)
    assert rep.skipped["0"] == "kdim=5 not divisible by n=2"
    assert rep.converted == ["1"]


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_flops_count_attention_projections_in_eval_mode():
    from torch.utils.flop_counter import FlopCounterMode

    model = SelfAttention()
    x = torch.randn(2, 5, 16)
    with FlopCounterMode(display=False) as counter:  # training mode: torch's unfused path
        model(x)
    rep = kronify.convert(model, n=2)
    rep.model.eval()
    flops = rep.flops(x)
    assert flops["dense"] == flops["converted"] == counter.get_total_flops() >= 2 * (2 * 5) * 16 * 16 * 4  # q, k, v, out projections
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_each_projection_weight_is_built_once_per_call(monkeypatch):
    """torch's forward reads in_proj_weight several times; the factors are expanded once per call."""
    import kronify.layers.base as base

    mha = KronMultiheadAttention(8, 2, n=2)
    x = torch.randn(3, 1, 8)
    expected = mha(x, x, x)[0]
    calls = []
    real = base._kron_weight
    monkeypatch.setattr(base, "_kron_weight", lambda A, F: calls.append(1) or real(A, F))
    torch.testing.assert_close(mha(x, x, x)[0], expected)
    assert len(calls) == 4  # q, k, v and out_proj
    assert mha._packed_in_proj is None  # nothing is kept between calls


def test_compiled_attention_matches_and_trains():
    mha = KronMultiheadAttention(8, 2, n=2, batch_first=True)
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(mha, backend="aot_eager")
    y = compiled(x, x, x)[0]
    torch.testing.assert_close(y, mha(x, x, x)[0])
    y.sum().backward()
    assert mha.q_proj.F.grad is not None and mha.q_proj.F.grad.abs().sum() > 0
    assert mha._packed_in_proj is None
