"""Composite loss: zero at identity, differentiable, each term sees its own kind of error, VGG handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronify.mri import backbones as W
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


# --------------------------------------------------------------------- the official code's terms
def _reference_terms(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-9) -> tuple[float, float]:
    """The image and frequency terms written out in numpy (float64), after the official ``total_loss``:
    Charbonnier mean(sqrt(d² + eps)) (shifted by sqrt(eps)) on the 2-channel image, and the average of the
    Charbonnier of the real and of the imaginary parts of the unnormalised FFT of each image's magnitude."""
    x, y = x.double().numpy(), y.double().numpy()

    def charb(d):
        return float(np.mean(np.sqrt(d * d + eps)) - np.sqrt(eps))

    fx = np.fft.fft2(np.hypot(x[:, 0], x[:, 1]), axes=(-2, -1))
    fy = np.fft.fft2(np.hypot(y[:, 0], y[:, 1]), axes=(-2, -1))
    return charb(x - y), (charb(fx.real - fy.real) + charb(fx.imag - fy.imag)) / 2


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(2, 17), w=st.integers(2, 17), seed=st.integers(0, 10_000),
       scale=st.floats(0.01, 10.0))
def test_terms_match_a_numpy_reference(b, h, w, seed, scale):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, 2, h, w, generator=g, dtype=torch.float64)
    x = y + scale * torch.randn(b, 2, h, w, generator=g, dtype=torch.float64)
    _, t = CompositeLoss(gamma=0)(x, y)
    image, freq = _reference_terms(x, y)
    assert t["image"].item() == pytest.approx(image, rel=1e-9)
    assert t["freq"].item() == pytest.approx(freq, rel=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), offset=st.floats(0.01, 1.0), amp=st.floats(0.5, 10.0))
def test_frequency_term_analytic_values_on_real_images(seed, offset, amp):
    """Real positive images (|x| = x): a constant offset c is the DC coefficient c·HW of the unnormalised FFT,
    real: Re term c (1 of HW entries, times HW), Im term 0, so freq = c/2, like the image term (c in 1 of 2
    channels). An error of ``amp`` in pixel (0, 0) has the flat spectrum amp: freq = amp/2, HW times its
    image term amp/(2HW)."""
    y = _images(seed, b=1).abs()
    y[:, 1] = 0.0
    loss = CompositeLoss(alpha=1.0, beta=1.0, gamma=0)
    _, t = loss(y + torch.tensor([offset, 0.0]).view(1, 2, 1, 1), y)
    assert t["image"].item() == pytest.approx(offset / 2, rel=1e-3, abs=1e-4)
    assert t["freq"].item() == pytest.approx(offset / 2, rel=1e-3, abs=1e-4)
    x = y.clone()
    x[0, 0, 0, 0] += amp
    _, t = loss(x, y)
    assert t["image"].item() == pytest.approx(amp / (2 * H * H), rel=1e-3)
    assert t["freq"].item() == pytest.approx(amp / 2, rel=1e-3)


def test_frequency_term_sees_magnitudes_only_and_each_image_alone():
    y = _images(10, b=3)
    c = torch.complex(y[:, 0].double(), y[:, 1].double()) * math.e ** (1j * 1.3)  # global phase change
    rotated = torch.stack([c.real, c.imag], dim=1).float()
    _, t = CompositeLoss(gamma=0)(rotated, y)
    assert t["image"] > 0.1 and t["freq"] < 1e-3 * t["image"]
    # F per image: a batch's term is the mean of its samples' terms (the official fftn over the batch axis
    # would mix the samples)
    x = y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    whole = CompositeLoss(gamma=0)(x, y)[1]["freq"]
    parts = [CompositeLoss(gamma=0)(x[i:i + 1], y[i:i + 1])[1]["freq"] for i in range(3)]
    torch.testing.assert_close(whole, torch.stack(parts).mean())


def test_frequency_term_weight_on_a_demo_slice(tmp_path):
    """On a 4x zero-filled 96x96 demo slice (the demo preset's crop) the weighted frequency term is a sizeable
    part of the loss, as in the official code; the orthonormal FFT of the complex image (our earlier term,
    written out here in numpy) made it ~100x smaller, so that training was in effect image-only."""
    import h5py
    from fastmri.data.subsample import RandomMaskFunc

    from kronify.mri.data.demo import build_demo_dataset

    root = build_demo_dataset(tmp_path, cases=1, crop=96, matrix=(192, 120), slices=2).root
    (path,) = sorted(root.glob("*/*.h5"))
    with h5py.File(path) as f:
        kspace = f["kspace"][0]
    image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace), norm="ortho"))  # fastmri.ifft2c
    top, left = (image.shape[0] - 96) // 2, (image.shape[1] - 96) // 2
    target = image[top:top + 96, left:left + 96]
    mask = RandomMaskFunc([0.08], [4], seed=0)((1, 96, 1), seed=0)[0].numpy().reshape(1, 96)
    zero_filled = np.fft.ifft2(np.fft.fft2(target) * np.fft.ifftshift(mask))
    scale = np.abs(zero_filled).max()

    def channels(z):
        return torch.from_numpy(np.stack([z.real, z.imag])[None] / scale).float()

    x, y = channels(zero_filled), channels(target)
    loss = CompositeLoss(gamma=0)
    _, t = loss(x, y)
    image_term, freq_term = _reference_terms(x, y)
    assert t["freq"].item() == pytest.approx(freq_term, rel=1e-4)
    assert 0.2 < loss.beta * t["freq"] / (loss.alpha * t["image"]) < 5
    kx = np.fft.fft2(np.fft.ifftshift(zero_filled / scale), norm="ortho")
    ky = np.fft.fft2(np.fft.ifftshift(target / scale), norm="ortho")
    orthonormal = np.mean(np.abs(np.concatenate([(kx - ky).real, (kx - ky).imag])))
    assert t["freq"] > 30 * orthonormal


def test_half_precision_inputs_are_scored_in_float32():
    """A network output in bf16/fp16 (autocast) is upcast: the FFT runs in float32 and the loss equals the float32
    loss of the same (rounded) values; gradients reach the half-precision tensor."""
    y = _images(11)
    for dtype in (torch.bfloat16, torch.float16):
        x = (y + 0.05 * torch.randn_like(y)).to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, t = CompositeLoss(gamma=0)(x, y)
        assert total.dtype == torch.float32
        want, _ = CompositeLoss(gamma=0)(x.detach().float(), y)
        torch.testing.assert_close(total.detach(), want)
        total.backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


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
