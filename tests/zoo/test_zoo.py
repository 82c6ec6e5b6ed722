"""zoo: every model and its Kronecker version (made by kronify.convert) keep the input's shape, train,
are deterministic in eval mode, and hold the parameter counts of the issue and of the paper.

Real forward/backward passes use the small presets (unet_demo, unet_ddpm_demo, swinmr_demo, modl_demo,
lbunet_small, efficient_unet), at 320×320 and 100×84; the large presets (unet, unet_ddpm, swinmr,
swinmr_paper, modl, lbunet) run the same shape paths on the meta device (shapes only), since a 320×320
SwinMR pass on 2 CPU cores takes minutes. SwinMR, MoDL and DDPM U-Net specifics (and the paper's Table 1
counts) are in test_zoo_swinmr.py, test_zoo_modl.py and test_zoo_unet_ddpm.py.
"""

from __future__ import annotations

import copy
import json

import fastmri
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kronify
import zoo
from zoo.padding import crop_to, pad_to_multiple
from zoo.summary import main as summary_main

SMALL = ["unet_demo", "unet_ddpm_demo", "swinmr_demo", "modl_demo", "lbunet_small", "efficient_unet"]
LARGE = ["unet", "unet_ddpm", "swinmr", "swinmr_paper", "modl", "lbunet"]
SIZES = [(320, 320), (100, 84)]

_CACHE: dict[str, nn.Module] = {}


def build(name: str) -> nn.Module:
    """Build (once per session) the model registered as `name`, seeded so runs repeat."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = zoo.create(name)
    return _CACHE[name]


def run(model: nn.Module, size: tuple[int, int], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    inputs = zoo.example_inputs(model, size, device=device)
    return inputs[0], model(*inputs)


# ---- registry ------------------------------------------------------------------------------------

def test_names_and_unknown_name():
    names = zoo.names()
    for base in zoo.dense_names():
        assert base in names and f"kron_{base}" in names and f"kron_{base}_complex" in names
    with pytest.raises(ValueError, match="unknown model 'resnet'.*unet_demo"):
        zoo.create("resnet")
    with pytest.raises(ValueError, match="valid names"):
        zoo.create("kron_nothing")


def test_overrides_reach_the_builder():
    m = zoo.create("unet", chans=4, num_pool_layers=2)
    assert m.chans == 4 and m.num_pool_layers == 2
    k = zoo.create("kron_unet_demo", chans=4)
    assert k.chans == 4 and isinstance(k.kron_report, kronify.ConversionReport)


def test_complex_algebra_variant():
    model, report = zoo.create_kron("kron_unet_complex", chans=4)
    kron_layers = [m for m in model.modules() if hasattr(m, "algebra")]
    assert kron_layers and all(m.algebra == "complex" for m in kron_layers)
    assert all(not m.A.requires_grad for m in kron_layers)
    assert report.converted


# ---- shapes, backward, determinism ----------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL + [f"kron_{n}" for n in SMALL])
def test_small_presets_shape_at_320(name):
    model = build(name).eval()
    with torch.no_grad():
        x, y = run(model, (320, 320))
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", SMALL + [f"kron_{n}" for n in SMALL])
def test_small_presets_odd_size_backward_determinism(name):
    model = build(name).train()
    x, y = run(model, (100, 84))
    assert y.shape == x.shape
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        inputs = zoo.example_inputs(model, (100, 84))
        assert torch.equal(model(*inputs), model(*inputs))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", LARGE + [f"kron_{n}" for n in LARGE])
def test_large_presets_shape_on_meta(name, size):
    model = build(name)
    meta = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad():
        x, y = run(meta, size, device="meta")
    assert y.shape == x.shape and y.device.type == "meta"


def test_swinmr_one_channel_build():
    model = zoo.create("swinmr_demo", in_chans=1).eval()
    x = torch.randn(1, 1, 20, 30)
    with torch.no_grad():
        assert model(x).shape == x.shape


# ---- Kronecker versions -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["unet", "unet_ddpm", "swinmr", "swinmr_paper", "modl"])
def test_kron_holds_at_most_055_of_dense_params(name):
    dense = sum(p.numel() for p in build(name).parameters())
    kron_model = build(f"kron_{name}")
    kron = sum(p.numel() for p in kron_model.parameters())
    report = kron_model.kron_report
    assert kron_model.kron_report.params_before == dense and report.params_after == kron
    assert kron <= 0.55 * dense, f"{name}: {kron} / {dense} = {kron / dense:.3f}"


@pytest.mark.parametrize("name", ["unet_demo", "unet_ddpm_demo", "swinmr_demo", "modl_demo", "lbunet_small",
                                  "lbunet", "efficient_unet"])
def test_report_lists_every_layer_left_dense_with_why(name):
    model = build(f"kron_{name}")
    report = model.kron_report
    dense_left = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
                  and not kronify.is_kron(m)}
    assert dense_left <= set(report.skipped), dense_left - set(report.skipped)
    assert all(reason for reason in report.skipped.values())
    assert report.converted
    if name in ("unet_demo", "swinmr_demo", "modl_demo"):
        assert not dense_left, f"{name}: nothing should stay dense at n=2, got {sorted(dense_left)}"
    if name == "efficient_unet":  # the depthwise convs cannot be split over n=2 input blocks
        assert any("conv_dw" in n for n in dense_left)


def test_kron_unet_reaches_conv_and_transposed_conv():
    model = build("kron_unet_demo")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert any(isinstance(m, nn.ConvTranspose2d) for m in convs) and all(kronify.is_kron(m) for m in convs)
    assert any(isinstance(m, nn.InstanceNorm2d) for m in model.modules())


def test_kron_settings_are_stated_once_per_model():
    for name in zoo.dense_names():
        s = zoo.kron_settings(name)
        assert set(s) == {"n", "exclude", "overrides"} and s["n"] == 2
    model, report = zoo.create_kron("unet_demo", n=4)
    assert {r.n for r in report.rows if r.status == "converted"} == {4}


# ---- parameter counts ---------------------------------------------------------------------------------

def test_summary_json_param_counts(capsys):
    assert summary_main(["--json", "--size", "64", "--models", "swinmr:in_chans=1", "modl", "unet"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for r in rows.values():
        assert {"name", "params", "gflops", "kron_params", "kron_gflops"} <= set(r)
        assert r["gflops"] > 0 and r["kron_gflops"] == pytest.approx(r["gflops"], rel=1e-6)
    assert abs(rows["swinmr:in_chans=1"]["params"] / 11.5e6 - 1) < 0.05
    assert abs(rows["modl"]["params"] / 113.7e3 - 1) < 0.05
    fastmri_unet = fastmri.models.Unet(in_chans=2, out_chans=2, chans=32, num_pool_layers=4, drop_prob=0.0)
    assert rows["unet"]["params"] == sum(p.numel() for p in fastmri_unet.parameters())


def test_paper_sized_presets():
    count = lambda name: sum(p.numel() for p in build(name).parameters())  # noqa: E731
    assert abs(count("lbunet_small") / 40e3 - 1) < 0.05
    assert abs(count("lbunet") / 1.025e6 - 1) < 0.05
    assert abs(count("efficient_unet") / 3.896e6 - 1) < 0.05


# ---- padding ----------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), multiple=st.sampled_from([1, 4, 8, 32]),
       mode=st.sampled_from(["reflect", "constant", "replicate"]))
def test_pad_to_multiple_roundtrip(h, w, multiple, mode):
    x = torch.randn(2, 3, h, w)
    padded, size = pad_to_multiple(x, multiple, mode)
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    assert padded.shape[-2] - h < multiple and padded.shape[-1] - w < multiple
    assert torch.equal(crop_to(padded, size), x)


@settings(max_examples=15, deadline=None)
@given(h=st.integers(9, 40), w=st.integers(9, 40))
def test_swinmr_any_size(h, w):
    torch.manual_seed(0)
    model = zoo.create("swinmr_demo", embed_dim=8, depths=(2,), num_heads=(2,), window_size=4).eval()
    x = torch.randn(1, 2, h, w)
    with torch.no_grad():
        assert model(x).shape == x.shape


def test_variant_names_are_built_once_by_the_registry():
    from zoo.registry import parse_name, variant_name

    assert variant_name("unet_demo", 0) == "unet_demo"
    assert variant_name("unet_demo", 2) == "kron_unet_demo"
    assert variant_name("unet_demo", 4) == "kron_unet_demo_n4"
    assert variant_name("unet_demo", 2, "complex") == "kron_unet_demo_complex"
    for name in zoo.dense_names():
        assert parse_name(variant_name(name, 2)) == (name, True, "learned")
        assert parse_name(variant_name(name, 2, "complex")) == (name, True, "complex")
