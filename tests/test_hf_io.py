"""kronify.save to a directory (the PEFT-like layout), kronify.load / kronify.from_pretrained back, save_pretrained
on converted transformers models, and every bad input: a clear error naming the thing, and nothing overwritten.
Models are built from tiny configs; nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import kronify
from kronify.io.hf import KronSavePretrained, install_save_pretrained
from kronify.io.store import write_weights
from kronify.parametrization import kron_param_count

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()
TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)


def perturb(model: nn.Module) -> nn.Module:
    """Move every tensor off its init, so that a load is really checked."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def converted_gpt2(**kw) -> tuple[GPT2LMHeadModel, kronify.KronConfig]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    report = kronify.convert(model, **kw)  # routes save_pretrained through kronify
    return perturb(model), report.config


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def files(path) -> dict[str, bytes]:
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


# ---- round trips ------------------------------------------------------------------------------------------
def test_gpt2_directory_round_trip_is_exact(tmp_path):
    model, cfg = converted_gpt2(n=2, embeddings=True, overrides={"re:.*mlp.c_fc": {"algebra": "complex"}})
    out = tmp_path / "gpt2-kron"
    kronify.save(model, out, config=cfg)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "kronify_config.json",
                                       "kronify_model.safetensors"]
    record = json.loads((out / "kronify_config.json").read_text())
    assert record["format"] == 3 and record["transformers_version"] == transformers.__version__
    assert kronify.KronConfig.from_dict(record["config"]) == cfg
    tied = {t["owner"]: t.get("tied_to") for t in record["tensors"]}
    assert tied["lm_head"] == "transformer.wte.weight"  # the head shares the embedding's factors
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    _, tensors = kronify.io.read_record(out)
    assert {"transformer.h.0.attn.c_attn.weight.kron_A", "transformer.h.0.mlp.c_fc.weight.kron_F",
            "transformer.wte.weight.kron_F"} <= set(tensors)

    loaded = kronify.from_pretrained(out)  # one line: config.json -> GPT2LMHeadModel -> layout -> weights
    assert type(loaded) is GPT2LMHeadModel and not loaded.training
    assert loaded.lm_head.parametrizations.weight is loaded.transformer.wte.parametrizations.weight
    assert torch.equal(logits(loaded), logits(model))
    onto = kronify.load(GPT2LMHeadModel(gpt2_config()), out)  # onto a model the user built
    assert torch.equal(logits(onto.eval()), logits(model))
    auto = kronify.from_pretrained(out, model_class=transformers.AutoModelForCausalLM)
    assert type(auto) is GPT2LMHeadModel and torch.equal(logits(auto), logits(model))


def test_bert_and_bfloat16_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=64, max_position_embeddings=16))
    kronify.convert(model, n=4, terms=2)
    perturb(model.to(torch.bfloat16))
    kronify.save(model, tmp_path / "bert")
    loaded = kronify.from_pretrained(tmp_path / "bert")
    assert type(loaded) is BertModel and loaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=TOKENS).last_hidden_state, model(input_ids=TOKENS).last_hidden_state)


def test_plain_torch_model_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Plain()
    kronify.convert(model, n=2)
    perturb(model)
    kronify.save(model, tmp_path / "plain")  # no config.json: the model is not a transformers model
    assert sorted(os.listdir(tmp_path / "plain")) == ["kronify_config.json", "kronify_model.safetensors"]
    x = torch.randn(2, 4, 5, 5)
    loaded = kronify.load(Plain().eval(), tmp_path / "plain")
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(kronify.load(Plain().eval(), tmp_path / "plain" / "kronify_model.safetensors")(x), model(x))
    with pytest.raises(ValueError, match="has no config.json .* kronify.load\\(model, directory\\)"):
        kronify.from_pretrained(tmp_path / "plain")


def saved_config(path) -> kronify.KronConfig:
    return kronify.KronConfig.from_dict(kronify.io.read_record(path)[0]["config"])


def test_save_stores_the_config_the_model_was_converted_or_loaded_with(tmp_path):
    model = Plain()
    cfg = kronify.convert(model, n=2, terms=2, overrides={"fc": {"n": 4}}).config
    kronify.save(model, tmp_path / "first")  # no config= : the conversion's
    assert saved_config(tmp_path / "first") == cfg and cfg.terms == 2
    loaded = kronify.load(Plain(), tmp_path / "first")
    kronify.save(loaded, tmp_path / "again.safetensors")  # a loaded model keeps it too
    assert saved_config(tmp_path / "again.safetensors") == cfg
    other = kronify.KronConfig(n=2)
    kronify.save(loaded, tmp_path / "given", config=other)  # an explicit config wins
    assert saved_config(tmp_path / "given") == other
    kronify.merge(loaded)  # a plain model again: nothing of kronify's is left on it
    assert not hasattr(loaded, "kronify_config")


def test_factors_under_another_parametrization_and_shared_layers_round_trip(tmp_path):
    def build():
        torch.manual_seed(0)
        shared = nn.Linear(6, 6)
        return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)), shared, nn.Tanh(), shared)

    model = build()
    kronify.convert(model, n=2)
    perturb(model)
    kronify.save(model, tmp_path / "s")
    _, tensors = kronify.io.read_record(tmp_path / "s")
    assert {"0.parametrizations.weight.original1.kron_A", "1.weight.kron_F", "3.weight.kron_F"} <= set(tensors)
    loaded = kronify.load(build().eval(), tmp_path / "s")
    assert loaded[1] is loaded[3]
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.sampled_from([2, 3, 4]), rows=st.integers(1, 4), cols=st.integers(1, 4), data=st.data())
def test_any_layout_round_trips_with_factors_of_the_expected_size(tmp_path_factory, n, rows, cols, data):
    algebra = data.draw(st.sampled_from(["learned"] + (["complex"] if n == 2 else ["quaternion"] if n == 4 else [])))
    terms = data.draw(st.integers(1, n * n)) if algebra == "learned" else None
    model = nn.Sequential(nn.Linear(cols * n, rows * n), nn.Tanh(), nn.Linear(rows * n, n))
    kronify.convert(model, n=n, terms=terms, algebra=algebra)
    perturb(model)
    out = tmp_path_factory.mktemp("layout") / "save"
    kronify.save(model, out)
    _, tensors = kronify.io.read_record(out)
    for name, layer in (("0", model[0]), ("2", model[2])):
        p = layer.parametrizations.weight[0]
        size = tensors[f"{name}.weight.kron_F"].numel()
        size += tensors[f"{name}.weight.kron_A"].numel() if p.learned else 0
        assert size == kron_param_count(p.shape, n, p.terms, learned=p.learned)
    base = nn.Sequential(nn.Linear(cols * n, rows * n), nn.Tanh(), nn.Linear(rows * n, n)).eval()
    x = torch.randn(3, cols * n)
    with torch.no_grad():
        assert torch.equal(kronify.load(base, out)(x), model(x))


# ---- save_pretrained ---------------------------------------------------------------------------------------
def test_save_pretrained_of_a_converted_model_is_a_kronify_save(tmp_path):
    model, cfg = converted_gpt2(n=2)
    assert isinstance(model.save_pretrained, KronSavePretrained)
    model.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(kronify.from_pretrained(tmp_path / "ckpt")), logits(model))
    # transformers' own loader fails loudly on it (no model.safetensors), never loads random layers silently
    with pytest.raises(OSError, match="model.safetensors"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt")
    # Trainer's call: a state dict and is_main_process
    model.save_pretrained(tmp_path / "rank1", state_dict=model.state_dict(), is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    model.save_pretrained(tmp_path / "trainer", state_dict=model.state_dict(), safe_serialization=True)
    assert torch.equal(logits(kronify.from_pretrained(tmp_path / "trainer")), logits(model))
    with pytest.raises(ValueError, match="does not support push_to_hub.*kronify.merge"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()
    # a model loaded by kronify gets it too, and a deep copy saves itself, not the original
    loaded = kronify.from_pretrained(tmp_path / "ckpt")
    clone = __import__("copy").deepcopy(loaded)
    assert clone.save_pretrained.model is clone


def test_save_pretrained_after_merge_is_a_plain_transformers_checkpoint(tmp_path):
    model, _ = converted_gpt2(n=2)
    expected = logits(model)
    kronify.merge(model)
    assert "save_pretrained" not in vars(model) and not hasattr(model, "kronify_config")
    model.save_pretrained(tmp_path / "merged")
    assert "model.safetensors" in os.listdir(tmp_path / "merged")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert (logits(plain) - expected).abs().max() < 1e-5


def test_save_pretrained_of_an_unconverted_model_is_untouched(tmp_path):
    model = GPT2LMHeadModel(gpt2_config()).eval()
    install_save_pretrained(model)  # even if asked: there is nothing Kronecker to save
    model.save_pretrained(tmp_path / "dense")
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "dense").eval()), logits(model))


# ---- bad input: a clear error, nothing overwritten, the model unchanged -------------------------------------
def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_refuses_to_overwrite_what_is_not_a_kronify_save(tmp_path):
    model, _ = converted_gpt2(n=2)
    dense = tmp_path / "dense"
    GPT2LMHeadModel(gpt2_config()).save_pretrained(dense)
    before = files(dense)
    with pytest.raises(FileExistsError, match="holds config.json, generation_config.json, model.safetensors but no "
                                              "kronify_config.json"):
        kronify.save(model, dense)
    assert files(dense) == before
    (tmp_path / "notes.bin").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="notes.bin' exists and is not a kronify save"):
        kronify.save(model, tmp_path / "notes.bin")
    assert (tmp_path / "notes.bin").read_bytes() == b"mine"
    # other files in a directory are left alone (a tokenizer, a README), and a kronify save is overwritten
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tokenizer.json").write_text("{}")
    kronify.save(model, shared)
    kronify.save(perturb(model), shared)
    assert (shared / "tokenizer.json").read_text() == "{}"
    assert torch.equal(logits(kronify.from_pretrained(shared)), logits(model))
    assert sorted(os.listdir(shared)) == ["config.json", "generation_config.json", "kronify_config.json",
                                          "kronify_model.safetensors", "tokenizer.json"]  # no temporary files


def test_load_errors_name_the_problem_and_leave_the_model_unchanged(tmp_path):
    model, _ = converted_gpt2(n=2)
    good = tmp_path / "good"
    kronify.save(model, good)
    record, tensors = kronify.io.read_record(good)

    def saved(name: str, record: dict = record, tensors: dict = tensors, json_record: dict | None = None):
        out = tmp_path / name
        out.mkdir()
        for f in ("config.json", "generation_config.json"):
            (out / f).write_bytes((good / f).read_bytes())
        (out / "kronify_config.json").write_text(json.dumps(json_record or record))
        write_weights(str(out / "kronify_model.safetensors"), tensors, record)
        return out

    cases = [
        (saved("missing", tensors={k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight.kron_F"}),
         r"missing keys \['transformer.h.1.mlp.c_fc.weight.kron_F'\]"),
        (saved("future", record={**record, "format": 99, "kronify_version": "9.0"}),
         r"kronify_config.json'?: kronify format 99 \(written by kronify 9.0\); this kronify .* reads formats 2, 3: "
         "upgrade kronify"),
        (saved("newer_config", record={**record, "config": {"n": 2, "shiny": 1}}), r"unknown field\(s\) \['shiny'\]"),
        (saved("mixed", json_record={**record, "kronify_version": "other"}), "come from different saves"),
        (tmp_path / "empty", "is not a kronify save: it has no kronify_config.json"),
    ]
    (tmp_path / "empty").mkdir()
    for path, message in cases:
        base = GPT2LMHeadModel(gpt2_config())
        before = state_of(base)
        with pytest.raises(ValueError, match=message):
            kronify.load(base, path)
        after = state_of(base)
        assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
        assert not hasattr(base.transformer.h[0].attn.c_attn, "parametrizations")

    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.weight is already parametrized"):
        kronify.load(model, good)  # the model is converted already
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        kronify.load(GPT2LMHeadModel(gpt2_config()), tmp_path / "nowhere")
    (good / "kronify_model.safetensors").unlink()
    with pytest.raises(ValueError, match="kronify_model.safetensors is missing"):
        kronify.from_pretrained(good)
    dense = tmp_path / "dense"
    GPT2LMHeadModel(gpt2_config()).save_pretrained(dense)
    with pytest.raises(ValueError, match="not a kronify save.*a transformers checkpoint\\? Load it with from_pretrained"):
        kronify.from_pretrained(dense)
    with pytest.raises(ValueError, match="is not a directory"):
        kronify.from_pretrained(tmp_path / "x.safetensors")


def test_an_interrupted_directory_save_is_refused_at_load(tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = converted_gpt2(n=2)
    kronify.save(model, tmp_path / "m")

    def broken_save(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        kronify.save(converted_gpt2(n=2, terms=3)[0], tmp_path / "m")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "generation_config.json", "kronify_config.json",
                                                  "kronify_model.safetensors"]
    with pytest.raises(ValueError, match="come from different saves"):
        kronify.from_pretrained(tmp_path / "m")
