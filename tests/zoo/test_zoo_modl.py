"""MoDL: the closed-form data consistency solves the same normal equations as conjugate gradients, has the
right limits in λ, and kronify.convert keeps the unrolled denoiser one shared module and λ as it was."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronify
import zoo
from zoo.modl import (CartesianSingleCoil, MoDL, ResidualDenoiser, conjugate_gradient, dc_cg, dc_closed_form,
                      fft2c, ifft2c, modl_demo)


def problem(seed: int = 0, h: int = 12, w: int = 10, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 1, 1, w, generator=g) < 0.4).double()
    mask[..., w // 2] = 1.0
    kspace = mask * fft2c(torch.randn(batch, 2, h, w, generator=g, dtype=torch.float64))
    z = torch.randn(batch, 2, h, w, generator=g, dtype=torch.float64)
    return z, mask, kspace


def test_fft_matches_fastmri_convention():
    import fastmri

    x = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    want = fastmri.fft2c(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(fft2c(x), want)
    torch.testing.assert_close(ifft2c(fft2c(x)), x)


@pytest.mark.parametrize("lam", [0.05, 1.0, 7.0])
def test_closed_form_equals_conjugate_gradient(lam):
    z, mask, kspace = problem()
    lam_t = torch.tensor(lam, dtype=torch.float64)
    closed = dc_closed_form(z, kspace, mask, lam_t)
    cg = dc_cg(z, kspace, CartesianSingleCoil(mask), lam_t, max_iter=30, tol=1e-14)
    torch.testing.assert_close(closed, cg, rtol=1e-9, atol=1e-9)
    # both solve (AᴴA + λI) x = Aᴴy + λz
    op = CartesianSingleCoil(mask)
    torch.testing.assert_close(op.normal(closed) + lam * closed, op.adjoint(kspace) + lam * z)


def test_conjugate_gradient_on_a_dense_spd_system():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    spd = m @ m.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(1, 6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: v @ spd.T, b, max_iter=50, tol=1e-14)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b[0])[None])


def test_lambda_limits():
    """λ weighs the prior ||x - z||² (MoDL's convention, k = (y + λ F z)/(1 + λ) on sampled columns):
    λ → 0 gives hard data consistency (the sampled k-space equals y exactly, the rest is F z);
    λ → ∞ trusts the denoiser (x → z)."""
    z, mask, kspace = problem()
    k = fft2c(dc_closed_form(z, kspace, mask, torch.tensor(1e-12, dtype=torch.float64)))
    sampled = mask.bool().expand_as(k)
    torch.testing.assert_close(k[sampled], kspace[sampled], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(k[~sampled], fft2c(z)[~sampled])
    far = dc_closed_form(z, kspace, mask, torch.tensor(1e12, dtype=torch.float64))
    torch.testing.assert_close(far, z, rtol=1e-9, atol=1e-9)


def test_parameter_count_matches_the_paper():
    model = MoDL()
    convs = 2 * 64 * 9 + 64 + 3 * (64 * 64 * 9 + 64) + 64 * 2 * 9 + 2
    assert sum(p.numel() for p in model.parameters()) == convs + 4 * 2 * 64 + 1 == 113_667
    assert model.lam.item() == pytest.approx(0.05)


def test_cg_mode_matches_closed_form_mode():
    torch.manual_seed(0)
    model = zoo.create("modl_demo").double().eval()
    x, mask, kspace = (t.double() for t in zoo.example_inputs(model, (16, 12)))
    cg = MoDL(iterations=2, features=16, dc="cg", cg_iterations=30).double().eval()
    cg.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask, kspace), cg(x, mask, kspace), rtol=1e-8, atol=1e-8)


def test_conversion_keeps_the_denoiser_shared_and_lambda_untouched():
    torch.manual_seed(0)
    model = zoo.create("modl")
    lam = model.lam_raw
    settings = {k: v for k, v in zoo.kron_settings("modl").items() if v is not None}
    report = kronify.convert(model, **settings)
    assert report.model is model and model.lam_raw is lam and model.lam.item() == pytest.approx(0.05)
    denoisers = [m for m in model.modules() if isinstance(m, ResidualDenoiser)]
    assert len(denoisers) == 1
    assert len(report.converted) == 5 and not report.skipped
    own = sum(p.numel() for p in model.denoiser.parameters())
    assert sum(p.numel() for p in model.parameters()) == own + 1 == report.params_after
    assert report.params_after <= 0.55 * report.params_before

    calls = []
    model.denoiser.register_forward_hook(lambda *_: calls.append(1))
    small = zoo.example_inputs(model, (16, 16))
    model.eval()
    with torch.no_grad():
        model(*small)
    assert len(calls) == model.iterations == 10


def test_registry_kron_modl_has_the_same_lambda():
    model = zoo.create("kron_modl_demo")
    assert isinstance(model, MoDL) and model.lam.item() == pytest.approx(0.05)
    assert model.lam.requires_grad


# -- λ stays positive ------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(lam_init=st.floats(1e-4, 50.0))
def test_lambda_is_softplus_of_its_parameter_and_starts_at_lam_init(lam_init):
    model = modl_demo(lam_init=lam_init)  # float32 parameter
    raw = model.lam_raw.item()
    assert math.log1p(math.exp(raw)) == pytest.approx(lam_init, rel=1e-6)
    assert model.lam.item() == pytest.approx(lam_init, rel=1e-6)
    (grad,) = torch.autograd.grad(model.lam, model.lam_raw)
    assert grad.item() == pytest.approx(1 / (1 + math.exp(-raw)), rel=1e-6)  # dλ/draw = sigmoid(raw)


def test_lambda_stays_positive_under_a_step_that_would_make_it_negative():
    model = modl_demo()
    raw = model.lam_raw.item()
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    model.lam.backward()  # dλ/dλ = 1: this SGD step on a plain λ would give 0.05 - 100 < 0
    opt.step()
    assert model.lam_raw.item() == pytest.approx(raw - 100.0 / (1 + math.exp(-raw)), rel=1e-6)
    assert model.lam_raw.item() < -5 and 0 < model.lam.item() < 0.01
    z, mask, kspace = problem()
    out = model.double().data_consistency(z, mask, kspace)
    torch.testing.assert_close(out, dc_closed_form(z, kspace, mask, model.lam.detach()))
    assert torch.isfinite(out).all()


def test_bad_lam_init_is_named():
    with pytest.raises(ValueError, match="lam_init must be > 0"):
        MoDL(lam_init=0.0)


def test_state_dict_with_plain_lambda_loads_as_that_lambda():
    """A checkpoint from before the softplus parameterisation holds λ itself under ``lam``; it loads to the same λ,
    also nested (e.g. the EMA copy inside a training module), and a non-positive one is a clear error."""
    torch.manual_seed(0)
    source = modl_demo()
    old = {k: v for k, v in source.state_dict().items() if k != "lam_raw"}
    old["lam"] = torch.tensor(0.3)
    model = modl_demo()
    model.load_state_dict(old)
    assert model.lam.item() == pytest.approx(0.3, rel=1e-6)
    torch.testing.assert_close(model.denoiser.net[0].weight, source.denoiser.net[0].weight)
    nested = torch.nn.ModuleDict({"ema": modl_demo()})
    nested.load_state_dict({f"ema.{k}": v for k, v in old.items()})
    assert nested["ema"].lam.item() == pytest.approx(0.3, rel=1e-6)
    before = model.lam.item()
    with pytest.raises(ValueError, match=r"'lam' = -0.2.*must be > 0"):
        model.load_state_dict({**old, "lam": torch.tensor(-0.2)})
    assert model.lam.item() == before
    assert old["lam"].item() == pytest.approx(0.3) and "lam_raw" not in old  # the caller's dict is untouched


# -- half precision ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dc", ["closed_form", "cg"])
def test_training_step_under_cpu_bf16_autocast(dc):
    """Under bf16 autocast the denoiser runs in bf16 and every FFT (data consistency, loss) in float32: a training
    step works (fastmri.fft2c rejects bf16) and its output stays close to the float32 model's."""
    from kronify.mri.losses import CompositeLoss

    torch.manual_seed(0)
    model = MoDL(iterations=2, features=16, dc=dc, cg_iterations=5)
    x, mask, kspace = zoo.example_inputs(model, (16, 12))
    target = x + 0.1 * torch.randn_like(x)
    with torch.no_grad():
        reference = model(x, mask, kspace)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask, kspace)
        loss, _ = CompositeLoss(gamma=0)(out, target)
    loss.backward()
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.lam_raw.grad is not None and model.denoiser.net[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    # an FFT handed bf16 tensors (as the denoiser outputs them) computes in float32
    z = torch.randn(1, 2, 8, 6).to(torch.bfloat16)
    torch.testing.assert_close(fft2c(z), fft2c(z.float()))
    torch.testing.assert_close(ifft2c(z), ifft2c(z.float()))
