"""Conversion at scale: layer by layer in place (each dense weight released once its factors exist), from a
safetensors checkpoint onto a model built on the meta device, the streaming nearest Kronecker sum, bf16."""

from __future__ import annotations

import copy
import json
import math
import sys
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

import kronify
import kronify.nearest as nearest_module
from kronify import kron_weight, nearest_kronecker
from kronify.checkpoint import Checkpoint
from kronify.config import KronConfig
from kronify.parametrization import KronParametrization, is_kron, kron_parametrizations
from kronify.plan import Selector, make_plans

transformers = pytest.importorskip("transformers")


def llama_config(tie: bool = False) -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    intermediate_size=48, max_position_embeddings=16, vocab_size=64,
                                    tie_word_embeddings=tie)


def llama(tie: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(tie)).to(dtype).eval()


def on_meta(tie: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(tie)).to(dtype)
    return model.eval()


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as a checkpoint holds it: tied tensors once (as transformers saves them)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            out[k] = v.contiguous()
            seen.add(v.data_ptr())
    return out


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()]) and not any(
        is_kron(m) for m in model.modules())


TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2]])


# ---- in place, layer by layer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: llama(),
    lambda: nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 6)),
    lambda: nn.MultiheadAttention(8, 2),  # one weight in 3 chunks
])
@pytest.mark.parametrize("algebra", ["learned", "complex"])
def test_layer_by_layer_gives_what_torchs_registration_gives(build, algebra):
    """convert (layer by layer, factors made beside the model and put in) equals torch's own path, registering a
    KronParametrization with register_parametrization (which calls right_inverse on the dense weight), bit for bit."""
    torch.manual_seed(1)
    model = build()
    other = copy.deepcopy(model)
    cfg = KronConfig(n=2, algebra=algebra, warm_start=True)
    report = kronify.convert(model, cfg)
    plans, _ = make_plans(other, cfg, Selector(cfg))
    for plan in plans:
        for t in plan.targets if plan.settings else []:
            p = KronParametrization(t.shape, plan.settings["n"], plan.settings["terms"], algebra, t.chunks)
            parametrize.register_parametrization(t.owner, t.tensor, p, unsafe=True)
    assert same_state(model, other)
    errors = {name: p.fit_error for name, _, _, p in kron_parametrizations(other)}
    assert {name: p.fit_error for name, _, _, p in kron_parametrizations(model)} == errors
    assert all(r.warm_start_error is not None and r.warm_start_error < 1 for r in report.rows if r.status == "converted")


def test_each_dense_weight_is_released_when_its_layer_is_converted(monkeypatch):
    """Peak memory is the model plus one layer's factors: when a layer is fitted, the dense weights of every layer
    converted before it are gone (weak references dead), and after convert none is left."""
    model = llama()
    dense = {name: weakref.ref(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    order = list(dense)
    module = sys.modules["kronify.apply"]
    original, alive_at_fit = module._fit, []

    def watching(target, settings, w, warm_start):
        alive_at_fit.append([name for name, ref in dense.items() if ref() is not None])
        return original(target, settings, w, warm_start)

    monkeypatch.setattr(module, "_fit", watching)
    kronify.convert(model, n=2, warm_start=True)
    assert len(alive_at_fit) == len(order)
    for k, alive in enumerate(alive_at_fit):
        assert alive == order[k:]  # the earlier layers' dense weights are already freed
    assert all(ref() is None for ref in dense.values())


def test_bf16_stays_bf16_and_matches_the_float64_fit_rounded():
    model = llama(dtype=torch.bfloat16)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    kronify.convert(model, n=2, warm_start=True)
    plist = model.model.layers[0].mlp.up_proj.parametrizations.weight
    assert plist.original0.dtype == plist.original1.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    A, F, _ = nearest_kronecker(w.double(), 2, 2)  # the same float64 fit, rounded once to bf16
    assert torch.equal(plist.original1, F.flatten(0, 1).to(torch.bfloat16))
    assert torch.equal(plist.original0, A.to(torch.bfloat16))
    assert model(TOKENS).logits.dtype == torch.bfloat16


# ---- from a checkpoint onto a meta model ----------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_meta_model_plus_checkpoint_equals_converting_in_memory(tmp_path, tie, sharded):
    dense = llama(tie)
    state = dense_state(dense)
    if sharded:  # the Hugging Face layout: shards plus model.safetensors.index.json
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for file, names in shards.items():
            save_file({k: state[k] for k in names}, tmp_path / file)
        index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(state, tmp_path / "model.safetensors")
    reference = copy.deepcopy(dense)
    expected = kronify.convert(reference, n=2, warm_start=True)
    model = on_meta(tie)
    report = kronify.convert(model, n=2, warm_start=True, checkpoint=tmp_path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert same_state(model, reference)
    assert [(r.name, r.status, r.warm_start_error) for r in report.rows] == \
        [(r.name, r.status, r.warm_start_error) for r in expected.rows]
    assert torch.equal(model(TOKENS).logits, reference(TOKENS).logits)
    if tie:  # lm_head stays tied to the embedding (one Parameter), as transformers built it
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_embedding_converted_from_a_checkpoint_shares_its_factors_with_the_head(tmp_path):
    dense = llama(tie=True)
    save_file(dense_state(dense), tmp_path / "model.safetensors")
    kronify.convert(dense, n=2, warm_start=True, embeddings=True)
    model = on_meta(tie=True)
    kronify.convert(model, n=2, warm_start=True, embeddings=True, checkpoint=tmp_path)
    assert model.lm_head.parametrizations.weight is model.model.embed_tokens.parametrizations.weight
    assert same_state(model, dense) and torch.equal(model(TOKENS).logits, dense(TOKENS).logits)


def test_checkpoint_tensors_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Each converted layer's dense tensor is dropped once its factors are made: at every read, no earlier dense
    tensor of a converted layer is alive."""
    save_file(dense_state(llama()), tmp_path / "model.safetensors")
    reads, original = [], Checkpoint.read

    def watching(self, name, *args, **kwargs):
        alive = [n for n, ref in reads if ref() is not None and n.endswith("proj.weight")]
        assert not alive, f"reading {name} while {alive} are still held"
        t = original(self, name, *args, **kwargs)
        reads.append((name, weakref.ref(t)))
        return t

    monkeypatch.setattr(Checkpoint, "read", watching)
    kronify.convert(on_meta(), n=2, warm_start=True, exclude=["lm_head"], checkpoint=tmp_path / "model.safetensors")
    assert sum(n.endswith("proj.weight") for n, _ in reads) == 14


def test_checkpoint_in_another_dtype_is_cast_to_the_model_dtype(tmp_path):
    save_file(dense_state(llama()), tmp_path / "model.safetensors")
    model = on_meta(dtype=torch.bfloat16)
    kronify.convert(model, n=2, warm_start=True, checkpoint=tmp_path / "model.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = llama(dtype=torch.bfloat16)
    kronify.convert(reference, n=2, warm_start=True)
    assert same_state(model, reference)


def _write(path, state):
    save_file(state, path)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), r"missing model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda s: s.pop("model.norm.weight"), r"missing model\.norm\.weight"),
    (lambda s: s.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 16)}),
     r"shape mismatch for model\.layers\.0\.self_attn\.q_proj\.weight \(32, 16\) \(the model's is \(32, 32\)\)"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(32, dtype=torch.int32)}),
     r"wrong dtype for model\.norm\.weight int32"),
])
def test_bad_checkpoint_raises_before_anything_changes(tmp_path, damage, message):
    state = dense_state(llama())
    damage(state)
    path = _write(tmp_path / "model.safetensors", state)
    model = on_meta()
    with pytest.raises(ValueError, match=message + ".*Nothing was changed"):
        kronify.convert(model, n=2, warm_start=True, checkpoint=path)
    assert all_meta(model)


def test_not_a_checkpoint_raises_clearly(tmp_path):
    model = on_meta()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        kronify.convert(model, n=2, checkpoint=junk)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        kronify.convert(model, n=2, checkpoint=tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        kronify.convert(model, n=2, checkpoint=tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"should hold one \*\.safetensors file"):
        kronify.convert(model, n=2, checkpoint=tmp_path / "empty")
    saved = tmp_path / "kron-save"
    saved.mkdir()
    (saved / "kronify_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a kronify save"):
        kronify.convert(model, n=2, checkpoint=saved)
    with pytest.raises(ValueError, match="calibration and budget need the whole dense model"):
        kronify.convert(model, n=2, budget=0.5, checkpoint=junk)
    assert all_meta(model)


def test_a_failure_while_fitting_from_a_checkpoint_leaves_the_meta_model_untouched(tmp_path, monkeypatch):
    state = dense_state(llama())
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")  # found only when its layer is read
    model = on_meta()
    with pytest.raises(RuntimeError, match="converting 'model.layers.1.mlp.down_proj' .*non-finite") as caught:
        kronify.convert(model, n=2, warm_start=True, checkpoint=_write(tmp_path / "model.safetensors", state))
    assert isinstance(caught.value.__cause__, ValueError)  # the fit's own error, with the layer named
    assert all_meta(model)


@pytest.mark.parametrize("warm_start", [True, False])
def test_meta_model_without_a_checkpoint_converts_shapes_only(warm_start):
    model = on_meta()
    report = kronify.convert(model, n=2, warm_start=warm_start)
    proj = model.model.layers[0].self_attn.q_proj
    assert is_kron(proj) and proj.weight.is_meta and proj.weight.shape == (32, 32)
    assert report.params_after < report.params_before
    assert all(r.warm_start_error is None for r in report.rows)


def test_plain_module_on_meta_with_a_non_persistent_buffer_is_refused(tmp_path):
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("scale", torch.ones(4), persistent=False)

    save_file(WithBuffer().state_dict(), tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = WithBuffer()
    with pytest.raises(ValueError, match="non-persistent buffers on the meta device that nothing can compute: scale"):
        kronify.convert(model, n=2, checkpoint=tmp_path / "m.safetensors")


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]))
def test_checkpoint_reads_what_safetensors_writes(tmp_path_factory, shape, dtype):
    t = (torch.randn(shape) * 10).to(dtype)
    path = tmp_path_factory.mktemp("ckpt") / "x.safetensors"
    save_file({"a": torch.arange(3), "t": t}, path)
    ckpt = Checkpoint(path)
    assert ckpt.entries["t"].shape == tuple(shape) and ckpt.entries["t"].dtype == dtype
    assert torch.equal(ckpt.read("t"), t) and torch.equal(ckpt.read("a"), torch.arange(3))


# ---- the streaming fit ----------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([2, 3]), p=st.integers(1, 6), q=st.integers(1, 4),
       kernel=st.lists(st.integers(1, 3), max_size=2), block=st.sampled_from([1, 7, 64]), data=st.data())
def test_streaming_over_blocks_does_not_change_the_fit(n, p, q, kernel, block, data):
    """Whatever the block size (down to one row of p per block), the fit is the whole-matrix one: the same
    Kronecker sum and error (the factors themselves may differ where the choice is free: the signs of u_t, or the
    directions of empty terms when R has fewer than `terms` non-zero singular values)."""
    terms = data.draw(st.integers(1, n * n))
    W = torch.randn(n * p, n * q, *kernel, dtype=torch.float64)
    A0, F0, e0 = nearest_kronecker(W, n, terms)
    kept, nearest_module._BLOCK_NUMEL = nearest_module._BLOCK_NUMEL, block
    try:
        A, F, e = nearest_kronecker(W, n, terms)
    finally:
        nearest_module._BLOCK_NUMEL = kept
    torch.testing.assert_close(kron_weight(A, F), kron_weight(A0, F0), rtol=1e-9, atol=1e-12)
    assert e == pytest.approx(e0, rel=1e-9, abs=1e-12)
    Wc = W.contiguous(memory_format=torch.channels_last) if W.dim() == 4 else W
    torch.testing.assert_close(kron_weight(*nearest_kronecker(Wc, n, terms)[:2]), kron_weight(A0, F0))


def rearranged(W: torch.Tensor, n: int) -> torch.Tensor:
    """The Van Loan–Pitsianis matrix R[(a, b), :] = vec(block (a, b) of W), built block by block."""
    p, q = W.shape[0] // n, W.shape[1] // n
    return torch.stack([W[a * p:(a + 1) * p, b * q:(b + 1) * q].reshape(-1) for a in range(n) for b in range(n)])


def test_gram_in_float64_resolves_small_terms_that_float32_would_lose():
    """The Gram matrix R·Rᵀ squares the condition number, so it is summed in float64: a term 1e-5 of the largest
    (σ² = 1e-10 of σ_0²) is still found as the float64 SVD finds it (to 1e-5 of its size), while float32 (eps 1e-7·σ_0²) cannot
    tell it from rounding."""
    torch.manual_seed(0)
    n, p, q = 2, 64, 48
    U = torch.linalg.qr(torch.randn(n * n, n * n, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(p * q, n * n, dtype=torch.float64))[0]
    sigma = torch.tensor([1.0, 1e-2, 1e-5, 0.0], dtype=torch.float64)
    A0 = (U * sigma).T.reshape(n * n, n, n)
    F0 = V.T.reshape(n * n, p, q)
    W = kron_weight(A0, F0)  # Kronecker terms σ_t u_t ⊗ v_t
    svd = torch.linalg.svd(rearranged(W, n), full_matrices=False)
    expected = kron_weight(*(t[:3] for t in (svd.U.T.reshape(4, n, n) * svd.S.view(4, 1, 1),
                                             svd.Vh.reshape(4, p, q))))
    A, F, err = nearest_kronecker(W, n, 3)
    assert err < 1e-9
    assert float((kron_weight(A, F) - expected).norm()) < 1e-5 * 1e-5  # the third term to 1e-5 of its own size
    R32 = rearranged(W, n).float()
    lam = torch.linalg.eigvalsh((R32 @ R32.T).double())
    assert abs(float(lam[-3]) - 1e-10) > 1e-10  # float32's estimate of σ_2² is off by more than σ_2² itself


def test_the_fit_streams_over_blocks_of_bounded_size():
    """The fit holds F and one float64 block, never a float64 copy of W: blocks are at most _BLOCK_NUMEL entries,
    and their number grows linearly with the rows (a structural check, not a timed one)."""
    W = torch.randn(2 * 300, 2 * 40)
    rows = max(1, nearest_module._BLOCK_NUMEL // (4 * 40))
    assert len(list(nearest_module._blocks(W, 2))) == math.ceil(300 / rows)
    sizes = {R.numel() for _, _, R in nearest_module._blocks(W, 2)}
    assert max(sizes) <= nearest_module._BLOCK_NUMEL
