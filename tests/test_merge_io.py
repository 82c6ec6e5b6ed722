"""kronify.merge (back to plain torch layers, export with jit.trace / ONNX) and kronify.save / load of a single
file (directories and Hugging Face models: test_hf_io.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kronify
from kronify.convert import is_kron


class Model(nn.Module):
    """Conv, transposed conv, attention and linear layers, one of them shared."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 6)
        self.fc_again = self.fc

    def forward(self, x):
        h = self.up(torch.relu(self.conv(x)))  # (B, 8, 2H, 2W)
        t = h.flatten(2).transpose(1, 2)  # (B, L, 8)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.out(self.fc_again(torch.relu(self.fc(t)))).mean(1)


def converted(seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = Model()
    kronify.convert(model, **kw)
    with torch.no_grad():  # move every factor off its init so that a load is really checked
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def x_in() -> torch.Tensor:
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_merge_restores_plain_torch_layers_and_outputs():
    model = converted(terms=3)
    x = x_in()
    with torch.no_grad():
        y = model(x)
    copy_ = kronify.merge(model, inplace=False)
    assert any(is_kron(m) for m in model.modules())  # inplace=False: the converted model is untouched
    merged = kronify.merge(model)
    assert merged is model and not any(is_kron(m) for m in model.modules())
    assert type(model.conv) is nn.Conv2d and type(model.up) is nn.ConvTranspose2d
    assert type(model.attn) is nn.MultiheadAttention and type(model.fc) is nn.Linear
    assert model.fc_again is model.fc  # sharing survives the merge
    assert isinstance(model.attn.in_proj_weight, nn.Parameter)
    layout = lambda m: [(k, v.shape, v.stride(), v.dtype) for k, v in m.state_dict().items()]  # noqa: E731
    assert layout(model) == layout(Model())  # the dense model's tensors, strides included: same kernels run
    with torch.no_grad():
        assert rel(model(x), y) < 1e-5
        assert rel(copy_(x), y) < 1e-5


def test_merged_model_exports_with_jit_trace_and_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = kronify.merge(converted())
    x = x_in()
    with torch.no_grad():
        y = model(x)
        traced = torch.jit.trace(model, x)
        assert rel(traced(x), y) < 1e-6
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    onnx.checker.check_model(onnx.load(str(path)))
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert rel(torch.from_numpy(out), y) < 1e-5


def test_save_load_round_trip_with_mixed_settings(tmp_path):
    from safetensors import safe_open

    cfg = kronify.KronConfig(overrides={"conv": {"n": 4, "terms": 16}, "fc": {"algebra": "complex"}, "out": None})
    model = converted(overrides=cfg.overrides)
    path = tmp_path / "m.safetensors"
    kronify.save(model, path, config=cfg)
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: no pickle anywhere
        record = json.loads(f.metadata()["kronify"])
        keys = set(f.keys())
    assert record["kronify_version"] and record["torch_version"] == torch.__version__ and record["format"] == 3
    assert kronify.KronConfig.from_dict(record["config"]) == cfg
    tensors = {(t["owner"], t["tensor"]): t for t in record["tensors"]}
    assert tensors["conv", "weight"] == {"owner": "conv", "tensor": "weight", "shape": [8, 4, 3, 3], "chunks": 1,
                                             "n": 4, "terms": 16, "algebra": "learned"}
    assert tensors["fc", "weight"]["algebra"] == "complex" and tensors["attn", "in_proj_weight"]["chunks"] == 3
    assert ("out", "weight") not in tensors and ("fc_again", "weight") not in tensors
    # factors say what they hold; a fixed algebra's constant A is stored too
    assert {"conv.weight.kron_A", "conv.weight.kron_F", "fc.weight.kron_A", "fc.weight.kron_F",
            "attn.in_proj_weight.kron_A", "out.weight"} <= keys
    assert not any("parametrizations" in k for k in keys)
    base = Model().eval()
    loaded = kronify.load(base, path)
    assert loaded is base and loaded.fc_again is loaded.fc and type(loaded.out) is nn.Linear
    assert loaded.attn.parametrizations.in_proj_weight[0].config() == model.attn.parametrizations.in_proj_weight[0].config()
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def snapshot(model):
    return [(id(m), type(m)) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    ids, state = snap
    assert [(id(m), type(m)) for m in model.modules()] == ids
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    assert not any(is_kron(m) for m in model.modules())


def test_load_errors_name_keys_and_leave_base_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model = converted()
    path = tmp_path / "m.safetensors"
    kronify.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))

    # extra and missing keys in the file
    bad = tmp_path / "bad.safetensors"
    save_file({**{k: v for k, v in state.items() if k != "out.bias"}, "extra.weight": torch.zeros(1)}, str(bad), meta)
    base = Model()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"missing keys \['out.bias'\]; unexpected keys \['extra.weight'\]"):
        kronify.load(base, bad)
    assert_same(base, snap)

    # a different architecture: a recorded layer does not exist / has other dims
    other = nn.Sequential(nn.Linear(8, 8))
    snap = snapshot(other)
    with pytest.raises(ValueError, match="layer 'conv' recorded in the file is not in the model"):
        kronify.load(other, path)
    assert_same(other, snap)
    wider = Model()
    wider.out = nn.Linear(8, 10)
    snap = snapshot(wider)
    with pytest.raises(ValueError, match=r"out.weight is of shape \(10, 8\) in the model; the file has shape \(6, 8\)"):
        kronify.load(wider, path)
    assert_same(wider, snap)

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a kronify.save file"):
        kronify.load(Model(), tmp_path / "plain.safetensors")
    with pytest.raises(FileExistsError, match="plain.safetensors' exists and is not a kronify save"):
        kronify.save(model, tmp_path / "plain.safetensors")  # nothing is overwritten
    assert load_file(str(tmp_path / "plain.safetensors")).keys() == {"a"}
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        kronify.load(Model(), tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no Kronecker layers"):
        kronify.save(Model(), tmp_path / "dense.safetensors")


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    model = converted()
    path = tmp_path / "m.safetensors"
    kronify.save(model, path)
    good = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        kronify.save(converted(seed=1), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


DATA = Path(__file__).parent / "data"


def test_a_format_2_file_of_kronify_0_1_still_loads():
    """tests/data/format2.safetensors was written by kronify 0.1 (format 2: torch's parametrize names in the
    file) from `converted(overrides=...)` below; format2_expected.safetensors holds its input and output."""
    from safetensors.torch import load_file

    record, tensors = kronify.io.read_record(DATA / "format2.safetensors")
    assert record["format"] == 2 and "conv.parametrizations.weight.original0" in tensors
    expected = load_file(str(DATA / "format2_expected.safetensors"))
    loaded = kronify.load(Model().eval(), DATA / "format2.safetensors")
    assert loaded.conv.parametrizations.weight[0].config() == {"n": 4, "terms": 16, "algebra": "learned"}
    with torch.no_grad():
        assert torch.equal(loaded(expected["x"]), expected["y"])
