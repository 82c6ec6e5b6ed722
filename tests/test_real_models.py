"""End to end on real networks (pretrained=False): exact warm start at terms=n², ~1/n parameters at
the default terms, a training step, and save -> load. One model instance per test, small inputs."""

from __future__ import annotations

import copy

import pytest
import torch

import kronify

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
fastmri_models = pytest.importorskip("fastmri.models")

N = 2

# name -> (factory, input shape). Small inputs where the architecture allows it.
MODELS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    "tv_vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32), (1, 3, 32, 32)),
    "tv_swin_t": (lambda: torchvision.models.swin_t(), (1, 3, 64, 64)),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(), (1, 3, 64, 64)),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), (1, 3, 64, 64)),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (1, 3, 64, 64)),
    "timm_vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32), (1, 3, 32, 32)),
    "timm_swin_tiny_patch4_window7_224": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2), (1, 3, 64, 64)),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto"), (1, 3, 64, 64)),
    "timm_maxvit_tiny_tf_224": (lambda: timm.create_model("maxvit_tiny_tf_224", img_size=64), (1, 3, 64, 64)),
    "fastmri_unet": (lambda: fastmri_models.Unet(2, 2, chans=8, num_pool_layers=3), (1, 2, 32, 32)),
}


def _randomize_zero_weights(model: torch.nn.Module) -> None:
    """Heads initialised to zero (torchvision ViT) would make every output 0 and the checks vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_end_to_end(name, tmp_path):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    _randomize_zero_weights(model)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    assert y.abs().max() > 0

    # 1. terms = n² with a warm start reproduces the dense model (float64).
    exact = kronify.convert(model, N, terms=N * N, warm_start=True, inplace=False)
    assert exact.converted
    with torch.no_grad():
        assert _rel(exact.model(x), y) < 1e-6
    assert all(r.warm_start_error < 1e-6 for r in exact.rows if r.status == "converted")
    if name == "timm_maxvit_tiny_tf_224":
        assert exact.traced is False and exact.trace_error
    elif name != "fastmri_unet":
        assert exact.traced is True
    del exact

    # 2. default terms: converted layers hold about 1/n of their parameters.
    base = copy.deepcopy(model).float()  # the dense architecture, for load() below
    model.float()
    report = kronify.convert(model, N)
    assert report.model is model
    assert 1 / N - 0.01 < report.converted_ratio < 1 / N + 0.01
    assert report.params_after < report.params_before
    conv_before = sum(r.params_before for r in report.rows if r.status == "converted")
    conv_after = sum(r.params_after for r in report.rows if r.status == "converted")
    assert report.params_before - report.params_after == conv_before - conv_after

    # 3. a training step runs and moves the factors.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    factor = next(m for m in model.modules() if isinstance(m, kronify.KronLinear | kronify.KronConv2d)).F
    before = factor.detach().clone()
    loss = model(x.float()).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, factor.detach())

    # 4. save -> load onto a fresh dense model reproduces the outputs.
    model.eval()
    path = tmp_path / "model.kron.pt"
    kronify.save(model, path)
    loaded = kronify.load(base, path)
    loaded.eval()
    with torch.no_grad():
        assert _rel(loaded(x.float()), model(x.float())) < 1e-6
