"""MoDL: the closed-form data consistency solves the same normal equations as conjugate gradients, has the
right limits in λ, and kronify.convert keeps the unrolled denoiser one shared module and λ as it was."""

from __future__ import annotations

import pytest
import torch

import kronify
import zoo
from zoo.modl import (CartesianSingleCoil, MoDL, ResidualDenoiser, conjugate_gradient, dc_cg, dc_closed_form,
                      fft2c, ifft2c)


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
    lam = model.lam
    settings = {k: v for k, v in zoo.kron_settings("modl").items() if v is not None}
    report = kronify.convert(model, **settings)
    assert report.model is model and model.lam is lam and lam.item() == pytest.approx(0.05)
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
