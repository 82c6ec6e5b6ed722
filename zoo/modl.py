"""MoDL (Aggarwal, Mani & Jacob, IEEE TMI 2019): model-based reconstruction with a learned denoiser,
unrolled K times with one shared set of weights.

Each iteration: z = D(x) (a 5-layer residual CNN), then data consistency
    x = argmin_x ||A x - y||² + λ ||x - z||²,  i.e.  (Aᴴ A + λ I) x = Aᴴ y + λ z.
For single-coil Cartesian sampling A = M F (F the centred orthonormal 2-D FFT, fastmri's fft2c), the
solve is diagonal in k-space: on sampled columns k = (y + λ F z) / (1 + λ), elsewhere k = F z.
A conjugate-gradient solver handles a general forward operator. Tensors are channel-first (B, 2, H, W)
(real, imaginary); the mask is (B, 1, 1, W) and broadcasts. The FFTs are kronify.mri.complex's, which run in
float32 even when the denoiser runs in bf16/fp16 under autocast.

λ is kept positive (the normal equations need λ > 0; a plain parameter can be pushed through 0 by one large
step): the model holds ``lam_raw`` and uses ``lam = softplus(lam_raw)``, with ``lam_raw`` initialised so that
``lam`` starts at ``lam_init``. A state dict saved before this change (a ``lam`` entry holding λ itself) is
converted on load (``lam_raw = softplus⁻¹(lam)``), so such checkpoints behave as they did.

Parameter count of the MoDL paper's denoiser (2→64→64→64→64→2, 3×3, bias, BatchNorm on the first four
layers): convs 1,216 + 3·36,928 + 1,154 = 113,154, BatchNorm 4·128 = 512, λ 1: 113,667 (≈ 113.7 k).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kronify.mri.complex import fft2c, ifft2c  # fastmri's centred orthonormal FFTs, channel-first, in float32

# The Kronecker version (`kron_modl`): every conv of the shared denoiser at n = 2 (2→64 and 64→2 divide
# by 2). λ (its parameter `lam_raw`) is outside any layer and stays as it is; the denoiser stays one shared module.
KRON_SETTINGS: dict = dict(n=2, exclude=None, overrides=None)


def inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    """softplus⁻¹(value) = value + log(1 − e^(−value)), value > 0: the raw parameter whose softplus is value."""
    return value + torch.log(-torch.expm1(-value))


class CartesianSingleCoil:
    """The forward operator A = M F of single-coil Cartesian MRI and its adjoint Aᴴ = Fᴴ M."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * fft2c(x)

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        return ifft2c(self.mask * k)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """Aᴴ A x."""
        return self.adjoint(self.forward(x))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product per batch item: Re⟨a, b⟩ for channel-first complex tensors."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def conjugate_gradient(apply_a: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                       x0: torch.Tensor | None = None, max_iter: int = 10, tol: float = 1e-10) -> torch.Tensor:
    """Solve apply_a(x) = rhs for a Hermitian positive-definite operator by conjugate gradients,
    batch item by batch item (each has its own step sizes); stops early when every residual is tiny."""
    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs - apply_a(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rs = _dot(r, r)
    for _ in range(max_iter):
        ap = apply_a(p)
        alpha = rs / _dot(p, ap).clamp_min(torch.finfo(rhs.dtype).tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        if bool((rs_new <= tol * tol).all()):
            break
        p = r + (rs_new / rs.clamp_min(torch.finfo(rhs.dtype).tiny)) * p
        rs = rs_new
    return x


def dc_closed_form(z: torch.Tensor, kspace: torch.Tensor, mask: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Data consistency for single-coil Cartesian sampling: solves (Aᴴ A + λ I) x = Aᴴ y + λ z exactly
    in k-space, (y + λ F z)/(1 + λ) on sampled columns and F z elsewhere."""
    kz = fft2c(z)
    k = torch.where(mask.bool(), (kspace + lam * kz) / (1 + lam), kz)
    return ifft2c(k)


def dc_cg(z: torch.Tensor, kspace: torch.Tensor, op: CartesianSingleCoil, lam: torch.Tensor,
          max_iter: int = 10, tol: float = 1e-10) -> torch.Tensor:
    """Data consistency for a general forward operator `op` (forward/adjoint/normal): the same normal
    equations (Aᴴ A + λ I) x = Aᴴ y + λ z, solved by conjugate gradients started at z."""
    rhs = op.adjoint(kspace) + lam * z
    return conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs, x0=z, max_iter=max_iter, tol=tol)


class ResidualDenoiser(nn.Module):
    """MoDL's denoiser D(x) = x + N(x): `layers` 3×3 convs, BatchNorm and ReLU after all but the last."""

    def __init__(self, in_chans: int = 2, features: int = 64, layers: int = 5, out_init: float = 1.0):
        super().__init__()
        if layers < 2:
            raise ValueError(f"layers must be >= 2, got {layers}")
        widths = [in_chans] + [features] * (layers - 1)
        blocks: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        blocks.append(nn.Conv2d(features, in_chans, 3, padding=1))
        if out_init != 1.0:  # a small last layer: D starts near the identity, so MoDL starts near zero-filling
            with torch.no_grad():
                blocks[-1].weight.mul_(out_init)
                blocks[-1].bias.mul_(out_init)
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MoDL(nn.Module):
    """Unrolled MoDL: x₀ = zero-filled image; K times z = D(x), x = DC(z). One `denoiser` module is
    called K times (shared weights). forward(x, mask, kspace) with x, kspace (B, 2, H, W), mask (B, 1, 1, W).
    ``denoiser_out_init`` scales the denoiser's last layer at initialisation (1: PyTorch's default init; the CPU
    demo uses 0.01 so that MoDL starts near the zero-filled image, which is already data-consistent)."""

    needs_kspace = True

    def __init__(self, iterations: int = 10, features: int = 64, layers: int = 5, lam_init: float = 0.05,
                 dc: str = "closed_form", cg_iterations: int = 10, in_chans: int = 2, denoiser_out_init: float = 1.0):
        super().__init__()
        if dc not in ("closed_form", "cg"):
            raise ValueError(f"dc must be 'closed_form' or 'cg', got {dc!r}")
        if in_chans != 2:
            raise ValueError(f"MoDL works on complex images as 2 channels (real, imag); got in_chans={in_chans}")
        self.in_chans, self.iterations, self.dc, self.cg_iterations = in_chans, iterations, dc, cg_iterations
        if not lam_init > 0:
            raise ValueError(f"lam_init must be > 0, got {lam_init}")
        if not denoiser_out_init > 0:
            raise ValueError(f"denoiser_out_init must be > 0 (a zero last layer gets no gradient through a "
                             f"Kronecker factorisation), got {denoiser_out_init}")
        self.denoiser = ResidualDenoiser(in_chans, features, layers, denoiser_out_init)
        self.lam_raw = nn.Parameter(inverse_softplus(torch.tensor(float(lam_init))))
        self.register_load_state_dict_pre_hook(_lam_from_old_state_dict)

    @property
    def lam(self) -> torch.Tensor:
        """λ = softplus(lam_raw), always > 0."""
        return F.softplus(self.lam_raw)

    def data_consistency(self, z: torch.Tensor, mask: torch.Tensor, kspace: torch.Tensor) -> torch.Tensor:
        if self.dc == "closed_form":
            return dc_closed_form(z, kspace, mask, self.lam)
        return dc_cg(z, kspace, CartesianSingleCoil(mask), self.lam, self.cg_iterations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kspace: torch.Tensor) -> torch.Tensor:
        for _ in range(self.iterations):
            x = self.data_consistency(self.denoiser(x), mask, kspace)
        return x


def _lam_from_old_state_dict(module: MoDL, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a ``lam`` entry (λ itself, as saved before the softplus parameterisation) becomes
    ``lam_raw = softplus⁻¹(lam)``; a non-positive λ cannot be represented and is an error naming the key."""
    old, new = prefix + "lam", prefix + "lam_raw"
    if old not in state_dict or new in state_dict:
        return
    lam = state_dict[old]
    if not bool((lam > 0).all()):
        raise ValueError(f"state dict entry {old!r} = {lam.tolist()}: MoDL's λ must be > 0 (it is now "
                         f"softplus({new}))")
    state_dict[new] = inverse_softplus(state_dict.pop(old).to(module.lam_raw.dtype))


def modl(**kwargs) -> MoDL:
    """MoDL as published: K = 10 shared iterations, 5-layer 64-feature denoiser, λ₀ = 0.05 (113.7 k params)."""
    return MoDL(**kwargs)


def modl_demo(iterations: int = 2, features: int = 16, **kwargs) -> MoDL:
    """A small MoDL for CPU demos and tests: K = 2, 16 features."""
    return MoDL(iterations=iterations, features=features, **kwargs)
