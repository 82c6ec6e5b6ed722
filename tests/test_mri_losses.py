"""Composite loss: zero at identity, differentiable, each term sees its own kind of error, VGG handling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronify.mri import weights as W
from kronify.mri.complex import ifft2c
from kronify.mri.losses import CompositeLoss, VGGPerceptualLoss, charbonnier

H = 32


def _random_vgg19_features(seed: int = 0) -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    return make_layers(cfgs["E"])


@pytest.fixture(scope="module")
def loss_with_random_vgg() -> CompositeLoss:
    return CompositeLoss(vgg_features=_random_vgg19_features())


def _images(seed: int, b: int = 2, h: int = H, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, h), indexing="ij")
    mag = torch.exp(-(xx**2 + yy**2) / 0.3) + 0.1 * torch.rand(b, h, h, generator=g)
    phase = torch.rand(b, 1, 1, generator=g) * 2 * xx + yy
    return torch.stack([mag * torch.cos(phase), mag * torch.sin(phase)], dim=1).to(dtype)


# --------------------------------------------------------------------- basics
def test_defaults_are_swinmrs():
    loss = CompositeLoss(gamma=0)
    assert (CompositeLoss.__init__.__defaults__) == (15.0, 0.1, 0.0025, 1e-9)
    assert (loss.alpha, loss.beta, loss.eps) == (15.0, 0.1, 1e-9)


def test_charbonnier_is_zero_at_identity_and_l1_like():
    x = torch.randn(4, 2, 8, 8)
    assert charbonnier(x, x).item() == 0.0
    d = torch.randn(4, 2, 8, 8)
    torch.testing.assert_close(charbonnier(x + d, x), (d.abs()).mean(), rtol=1e-4, atol=1e-4)


def test_zero_for_identical_inputs(loss_with_random_vgg):
    x = _images(1)
    for loss_fn in (CompositeLoss(gamma=0), loss_with_random_vgg):
        total, terms = loss_fn(x, x.clone())
        assert total.item() == 0.0
        assert all(v.item() == 0.0 for v in terms.values())
    assert set(terms) == {"image", "freq", "perceptual"}


def test_total_is_the_weighted_sum_of_terms(loss_with_random_vgg):
    x, y = _images(2), _images(3)
    total, t = loss_with_random_vgg(x, y)
    expected = 15.0 * t["image"] + 0.1 * t["freq"] + 0.0025 * t["perceptual"]
    torch.testing.assert_close(total.detach(), expected)
    assert all(v > 0 for v in t.values()) and not any(v.requires_grad for v in t.values())
    total0, t0 = CompositeLoss(alpha=2.0, beta=3.0, gamma=0)(x, y)
    torch.testing.assert_close(total0, 2.0 * t0["image"] + 3.0 * t0["freq"])
    assert t0["perceptual"].item() == 0.0


# --------------------------------------------------------------------- each term sees its own error
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ky=st.integers(0, H - 1),
    kx=st.integers(0, H - 1),
    amp=st.floats(0.5, 10.0),
)
def test_frequency_sparse_error_is_small_in_kspace_term_image_sparse_error_small_in_image_term(seed, ky, kx, amp):
    """A single k-space coefficient error is 1 of 2HW k-space entries but spreads over every pixel;
    a single-pixel error is the reverse. Each term measures the error in its own domain (≈ L1 there)."""
    loss = CompositeLoss(alpha=1.0, beta=1.0, gamma=0)
    y = _images(seed, b=1)
    dk = torch.zeros(1, 2, H, H)
    dk[0, 0, ky, kx] = amp  # one (possibly high-frequency) k-space coefficient
    x = y + ifft2c(dk)
    _, t = loss(x, y)
    assert t["freq"].item() == pytest.approx(amp / (2 * H * H), rel=1e-3)
    assert t["image"] > 4 * t["freq"]
    di = torch.zeros(1, 2, H, H)
    di[0, 1, ky, kx] = amp  # one pixel
    _, t = loss(y + di, y)
    assert t["image"].item() == pytest.approx(amp / (2 * H * H), rel=1e-3)
    assert t["freq"] > 4 * t["image"]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), offset=st.floats(0.01, 1.0))
def test_image_offset_moves_image_term_by_its_size(seed, offset):
    loss = CompositeLoss(alpha=1.0, beta=1.0, gamma=0)
    y = _images(seed, b=1)
    _, t = loss(y + offset, y)
    # Charbonnier(d) = sqrt(d² + ε) − sqrt(ε) ≈ |d| − 3e-5 for |d| ≫ sqrt(ε)
    assert t["image"].item() == pytest.approx(offset, abs=1e-4)
    # a constant offset is k-space's DC coefficient only: sqrt(HW)·offset in 2 of 2HW entries
    assert t["freq"].item() == pytest.approx(2 * offset * H / (2 * H * H), rel=1e-3, abs=1e-5)


def test_perceptual_term_sees_magnitude_not_phase(loss_with_random_vgg):
    y = _images(4)
    c = torch.complex(y[:, 0].double(), y[:, 1].double()) * math.e ** (1j * 0.7)  # global phase change
    rotated = torch.stack([c.real, c.imag], dim=1).float()
    _, t_rot = loss_with_random_vgg(rotated, y)
    blurred = y.clone()
    blurred[..., 1:-1, :] = (y[..., :-2, :] + y[..., 1:-1, :] + y[..., 2:, :]) / 3  # structural change
    _, t_blur = loss_with_random_vgg(blurred, y)
    assert t_rot["image"] > 0.05 and t_rot["freq"] > 0.01  # phase error seen by the complex terms
    assert t_rot["perceptual"] < 1e-4 * t_blur["perceptual"]  # ... not by the magnitude-based perceptual term
    assert t_blur["perceptual"] > 0


# --------------------------------------------------------------------- differentiability
def test_gradcheck_image_and_frequency_terms():
    loss = CompositeLoss(gamma=0, eps=1e-3)  # larger eps: smooth enough for finite differences
    y = _images(5, b=1, h=6, dtype=torch.float64)
    x = (y + 0.1 * torch.randn_like(y)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: loss(a, y)[0], (x,))


def test_perceptual_gradient_matches_finite_difference(loss_with_random_vgg):
    y = _images(6, b=1, dtype=torch.float64)
    x = (y + 0.05 * torch.randn_like(y)).requires_grad_(True)
    total, _ = loss_with_random_vgg(x, y)
    (grad,) = torch.autograd.grad(total, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    v = torch.randn_like(y)
    h = 1e-6
    with torch.no_grad():
        fd = (loss_with_random_vgg(x + h * v, y)[0] - loss_with_random_vgg(x - h * v, y)[0]) / (2 * h)
    assert fd.item() == pytest.approx((grad * v).sum().item(), rel=1e-3)


def test_gradients_finite_with_zero_pixels(loss_with_random_vgg):
    y = _images(7)
    x = torch.zeros_like(y).requires_grad_(True)  # |x| = 0 everywhere: no NaN from the magnitude
    loss_with_random_vgg(x, y)[0].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------- VGG handling
def test_vgg_is_frozen_eval_and_outside_state_dict(loss_with_random_vgg):
    model = nn.Conv2d(2, 2, 3, padding=1)

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.loss = model, loss_with_random_vgg

    m = Module().train()
    assert set(m.state_dict()) == {"model.weight", "model.bias"}
    assert [p for p in m.parameters()] == [model.weight, model.bias]
    vgg = loss_with_random_vgg.perceptual
    assert isinstance(vgg, VGGPerceptualLoss) and not vgg.features.training
    vgg.train()
    assert not vgg.features.training
    assert all(not p.requires_grad for p in vgg.parameters())
    y = _images(8)
    m.loss(m.model(y), y)[0].backward()
    assert model.weight.grad is not None and all(p.grad is None for p in vgg.parameters())
    # features are taken before the ReLU (pre-activation maps can be negative)
    feats = vgg._feats(torch.rand(1, 3, H, H))
    assert len(feats) == 5 and all((f < 0).any() for f in feats)


def test_gamma_without_vgg_weights_is_a_clear_error(offline_hub):
    with pytest.raises(W.MissingWeightsError) as err:
        CompositeLoss()
    msg = str(err.value)
    assert W.VGG19.filename in msg and str(offline_hub) in msg and W.VGG19.env_var in msg
    assert "gamma=0" in msg
    with pytest.raises(W.MissingWeightsError, match="nowhere.pth"):
        CompositeLoss(gamma=1.0, vgg_weights_path="/nowhere.pth")
    assert CompositeLoss(gamma=0).perceptual is None  # gamma = 0 needs nothing
    assert not offline_hub.exists()


def test_vgg19_loaded_from_checkpoint_file(offline_hub):
    """The real-weights code path, fed a torchvision-format VGG19 checkpoint (features only) written here."""
    feats = _random_vgg19_features(seed=3)
    offline_hub.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, offline_hub / W.VGG19.filename)
    loss = CompositeLoss()
    torch.testing.assert_close(loss.perceptual.features[34].weight, feats[34].weight)
    (offline_hub / W.VGG19.filename).write_bytes(b"truncated")
    with pytest.raises(W.MissingWeightsError, match="could not read"):
        CompositeLoss()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="beta must be >= 0"):
        CompositeLoss(beta=-1, gamma=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        CompositeLoss(eps=0, gamma=0)
    with pytest.raises(ValueError, match="Conv2d at indices"):
        CompositeLoss(vgg_features=nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        CompositeLoss(gamma=0)(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_with_real_vgg19_weights():
    if W.find_weights(W.VGG19) is None:
        pytest.skip(W.missing_weights_message(W.VGG19))
    loss = CompositeLoss()
    y = _images(9)
    assert loss(y, y)[0].item() == 0.0
    small = loss(y + 0.01 * torch.randn_like(y), y)[1]["perceptual"]
    large = loss(y + 0.2 * torch.randn_like(y), y)[1]["perceptual"]
    assert 0 < small < large
