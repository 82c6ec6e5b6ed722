"""End to end on real networks built from configs with random weights (nothing downloaded): every eligible
layer converted (dense only for divisibility, depthwise or tied weights, with the reason), exact warm start
at terms=n² in float64, ~1/n parameters at the default terms, a training step, and save -> load exactly.
Each test imports only what its model needs and skips alone (with the reason) when that is missing."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import kronify

N = 2
ALLOWED_DENSE = re.compile(r"not divisible by n=|depthwise|tied weights")


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    tiny = dict(vocab_size=64)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, **tiny)
        return transformers.GPT2LMHeadModel(cfg), "logits"
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, **tiny)
        return transformers.BertModel(cfg), "last_hidden_state"
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16, **tiny)
        return transformers.LlamaForCausalLM(cfg), "logits"
    if name == "t5":
        cfg = transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, **tiny)
        return transformers.T5ForConditionalGeneration(cfg), "logits"
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=8)
    return transformers.ViTModel(cfg), "last_hidden_state"


def _timm(name: str):
    timm = pytest.importorskip("timm")
    return timm.create_model(name), None


def _torchvision(name: str):
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.get_model(name, weights=None), None


def _fastmri_unet(_):
    models = pytest.importorskip("fastmri.models")
    return models.Unet(2, 2, chans=8, num_pool_layers=3), None


# name -> (builder, its argument, kind of input)
MODELS = {
    "hf_gpt2": (_hf, "gpt2", "tokens"),
    "hf_bert": (_hf, "bert", "tokens"),
    "hf_llama": (_hf, "llama", "tokens"),
    "hf_t5": (_hf, "t5", "seq2seq"),
    "hf_vit": (_hf, "vit", (1, 3, 16, 16)),
    "timm_resnetv2_50x1_bit": (_timm, "resnetv2_50x1_bit", (1, 3, 32, 32)),
    "timm_nf_regnet_b0": (_timm, "nf_regnet_b0", (1, 3, 32, 32)),
    "timm_convnext_atto": (_timm, "convnext_atto", (2, 3, 32, 32)),
    "tv_resnet18": (_torchvision, "resnet18", (2, 3, 32, 32)),
    "tv_swin_t": (_torchvision, "swin_t", (1, 3, 32, 32)),
    "fastmri_unet": (_fastmri_unet, None, (1, 2, 32, 32)),
}


class Wrapped(nn.Module):
    """One call signature for every model: tensors in, one tensor out."""

    def __init__(self, model: nn.Module, output: str | None) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, *inputs):
        if self.output is None:
            return self.model(*inputs)
        if len(inputs) == 2:
            out = self.model(input_ids=inputs[0], decoder_input_ids=inputs[1])
        elif inputs[0].is_floating_point():
            out = self.model(pixel_values=inputs[0])
        else:
            out = self.model(input_ids=inputs[0])
        return getattr(out, self.output)


def _inputs(kind, dtype):
    g = torch.Generator().manual_seed(0)
    if kind == "tokens":
        return (torch.randint(0, 64, (2, 8), generator=g),)
    if kind == "seq2seq":
        return torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 4), generator=g)
    return (torch.randn(kind, generator=g, dtype=dtype),)


def _randomize_zero_weights(model: nn.Module) -> None:
    """Heads initialised to zero would make every output 0 and the checks vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_end_to_end(name, tmp_path):
    build, arg, kind = MODELS[name]
    torch.manual_seed(0)
    inner, output = build(arg)
    model = Wrapped(inner, output).double().eval()
    _randomize_zero_weights(model)
    x = _inputs(kind, torch.float64)
    with torch.no_grad():
        y = model(*x)
    assert y.abs().max() > 0

    # 1. terms = n² with a warm start reproduces the dense model (float64); dense only for the allowed reasons.
    exact = kronify.convert(model, N, terms=N * N, warm_start=True, inplace=False)
    assert exact.converted
    bad = {k: v for k, v in exact.skipped.items() if not ALLOWED_DENSE.search(v)}
    assert not bad, bad
    with torch.no_grad():
        assert _rel(exact.model(*x), y) < 1e-9
    assert all(r.warm_start_error < 1e-9 for r in exact.rows if r.status == "converted")
    del exact

    # 2. default terms: converted layers hold about 1/n of their parameters.
    base = copy.deepcopy(model).float()  # the dense architecture, for load() below
    model.float()
    x = _inputs(kind, torch.float32)
    report = kronify.convert(model, N)
    assert report.model is model
    assert 1 / N - 0.005 < report.converted_ratio < 1 / N + 0.03
    conv_before = sum(r.params_before for r in report.rows if r.status == "converted")
    conv_after = sum(r.params_after for r in report.rows if r.status == "converted")
    assert report.params_before - report.params_after == conv_before - conv_after > 0

    # 3. a training step runs and moves the factors.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    factors = [p for n, p in model.named_parameters() if n.endswith("parametrizations.weight.original1")]
    before = [f.detach().clone() for f in factors]
    out = model(*x).float()
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).mean()  # not normalized away
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(f.grad).all() for f in factors if f.grad is not None)
    moved = sum(not torch.equal(b, f.detach()) for b, f in zip(before, factors))  # (a pooler output is unused)
    assert moved > len(factors) // 2, f"{moved} of {len(factors)} factors moved"

    # 4. save -> load onto a fresh dense model reproduces the outputs exactly.
    model.eval()
    path = tmp_path / "model.safetensors"
    kronify.save(model, path, config=report.config)
    loaded = kronify.load(base, path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), model(*x), rtol=0, atol=0)


def test_gpt2_conv1d_and_tied_head_then_save_pretrained_after_merge(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, _ = _hf("gpt2")
    report = kronify.convert(model)
    assert "transformer.h.0.attn.c_attn" in report.converted
    assert report.rows[0].kind == "Conv1D" and tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (32, 96)
    assert "tied weights" in report.skipped["lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 64, (1, 8))
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
    kronify.merge(model)
    assert not any(kronify.is_kron(m) for m in model.modules())
    model.save_pretrained(tmp_path / "merged")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, y)
