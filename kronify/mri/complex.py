"""Complex-image layout helpers.

kronify keeps complex images channel-first, ``(..., 2, H, W)`` with (real, imag) channels, so they feed
convolutions directly; fastMRI keeps them channel-last, ``(..., H, W, 2)``. These helpers convert between
the two and wrap fastMRI's centred, orthonormal FFTs (``fastmri.fft2c`` / ``fastmri.ifft2c``) for the
channel-first layout.

Every FFT here runs in float32 (or float64) whatever the input dtype: a network run under bf16/fp16 autocast
hands over half-precision outputs, which ``fastmri.fft2c`` rejects (no bf16 complex type) and which would lose
most of k-space's dynamic range in fp16. :func:`fft_precision` does the upcast; the results stay float32.
"""

from __future__ import annotations

import functools

import fastmri
import torch
from torch import Tensor

__all__ = [
    "fft2c",
    "fft2c_masked",
    "fft_precision",
    "from_complex",
    "from_fastmri",
    "ifft2c",
    "ifft2c_crop",
    "magnitude",
    "to_complex",
    "to_fastmri",
]


def _check_channels_first(x: Tensor) -> None:
    if x.dim() < 3 or x.shape[-3] != 2:
        raise ValueError(f"expected a channel-first complex tensor shaped (..., 2, H, W), got {tuple(x.shape)}")


def to_fastmri(x: Tensor) -> Tensor:
    """(..., 2, H, W) -> fastMRI's (..., H, W, 2) (contiguous)."""
    _check_channels_first(x)
    return x.movedim(-3, -1).contiguous()


def from_fastmri(x: Tensor) -> Tensor:
    """fastMRI's (..., H, W, 2) -> (..., 2, H, W) (contiguous)."""
    if x.dim() < 3 or x.shape[-1] != 2:
        raise ValueError(f"expected a fastMRI complex tensor shaped (..., H, W, 2), got {tuple(x.shape)}")
    return x.movedim(-1, -3).contiguous()


def to_complex(x: Tensor) -> Tensor:
    """(..., 2, H, W) real tensor -> (..., H, W) complex tensor."""
    _check_channels_first(x)
    return torch.complex(x[..., 0, :, :], x[..., 1, :, :])


def from_complex(z: Tensor) -> Tensor:
    """(..., H, W) complex tensor -> (..., 2, H, W) real tensor."""
    if not z.is_complex():
        raise ValueError(f"expected a complex tensor, got dtype {z.dtype}")
    return torch.stack((z.real, z.imag), dim=-3)


_FFT_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


def fft_precision(x: Tensor) -> Tensor:
    """``x`` in single precision when it is in half precision (float16, bfloat16, complex32; e.g. a network's
    output under autocast), else unchanged: the precision every FFT of this package runs in."""
    dtype = _FFT_DTYPES.get(x.dtype)
    return x if dtype is None else x.to(dtype)


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2D FFT (``fastmri.fft2c``) of a channel-first complex image (..., 2, H, W),
    computed in float32 at least (see :func:`fft_precision`)."""
    return from_fastmri(fastmri.fft2c(to_fastmri(fft_precision(x))))


def ifft2c(k: Tensor) -> Tensor:
    """Centred orthonormal inverse 2D FFT (``fastmri.ifft2c``) of channel-first k-space (..., 2, H, W),
    computed in float32 at least (see :func:`fft_precision`)."""
    return from_fastmri(fastmri.ifft2c(to_fastmri(fft_precision(k))))


def magnitude(x: Tensor) -> Tensor:
    """|x| of a channel-first complex image: (..., 2, H, W) -> (..., H, W)."""
    _check_channels_first(x)
    return torch.sqrt(x[..., 0, :, :] ** 2 + x[..., 1, :, :] ** 2)


@functools.lru_cache(maxsize=32)
def _crop_rows(n: int, size: int) -> tuple[int, Tensor]:
    """Where the centre crop of fftshift(y) starts in y (it wraps around circularly), and the sign
    (-1)^index that replaces the ifftshift of the input of an inverse FFT of even length n."""
    start = ((n - size) // 2 - n // 2) % n
    index = (torch.arange(size) + start) % n
    return start, (1 - 2 * (index % 2)).to(torch.float32)


def _circular_narrow(x: Tensor, dim: int, start: int, size: int) -> Tensor:
    """``size`` entries of ``x`` along ``dim`` from ``start``, wrapping around (two block copies at most)."""
    n = x.shape[dim]
    if start + size <= n:
        return x.narrow(dim, start, size)
    return torch.cat((x.narrow(dim, start, n - start), x.narrow(dim, 0, size - (n - start))), dim=dim)


def ifft2c_crop(kspace: Tensor, crop: tuple[int, int]) -> Tensor:
    """``complex_center_crop(fastmri.ifft2c(kspace), crop)`` for a complex-dtype k-space (..., H, W), computed
    faster: a 1D inverse FFT along H, keeping only the crop's rows, then along W, keeping only its columns.

    Same centring and orthonormal scaling as fastmri. For an even length n, ``fftshift(ifft(ifftshift(x)))``
    is ``ifft(x)`` with rows reordered and multiplied by (-1)^row, so no shifted copy of the full k-space is
    made; odd lengths use the shifts.
    """
    if not kspace.is_complex():
        raise ValueError(f"expected a complex-dtype k-space (..., H, W), got dtype {kspace.dtype}")
    x, sign = fft_precision(kspace), None
    for dim, size in ((-2, crop[0]), (-1, crop[1])):
        n = x.shape[dim]
        if not 0 < size <= n:
            raise ValueError(f"crop {tuple(crop)} does not fit an image of size {tuple(kspace.shape[-2:])}")
        if n % 2 == 0:
            start, s = _crop_rows(n, size)
            x = _circular_narrow(torch.fft.ifft(x, dim=dim, norm="ortho"), dim, start, size)
            s = s if dim == -1 else s[:, None]
            sign = s if sign is None else sign * s
        else:
            x = torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(x, dim=dim), dim=dim, norm="ortho"), dim=dim)
            x = x.narrow(dim, (n - size) // 2, size)
    return x if sign is None else x * sign.to(x.real.dtype)


@functools.lru_cache(maxsize=32)
def _chequerboard(height: int, width: int) -> tuple[Tensor, Tensor]:
    """C = (-1)^(row + col) and (-1)^((H + W) / 2) C. For even H and W, fastmri's
    fftshift(fft2(ifftshift(x))) = (-1)^((H+W)/2) C * fft2(C * x), and the same for the inverse."""
    c = (1 - 2 * ((torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2)).to(torch.float32)
    return c, c * (-1.0) ** ((height + width) // 2)


def fft2c_masked(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Masked k-space ``mask * fastmri.fft2c(image)`` and zero-filled image ``fastmri.ifft2c(masked k-space)``
    of a complex-dtype image (..., H, W) and a column mask (W,), in fastmri's centred orthonormal convention.

    For even H and W the centring shifts become a chequerboard modulation (no shifted copies), and since the
    column mask commutes with it the zero-filled image is ``C * ifft2(mask * fft2(C * image))``.
    """
    if not image.is_complex():
        raise ValueError(f"expected a complex-dtype image (..., H, W), got dtype {image.dtype}")
    image = fft_precision(image)
    height, width = image.shape[-2:]
    if height % 2 == 0 and width % 2 == 0:
        c, sc = _chequerboard(height, width)
        c, sc = c.to(image.real.dtype), sc.to(image.real.dtype)
        y = torch.fft.fft2(image * c, norm="ortho") * mask
        return y * sc, torch.fft.ifft2(y, norm="ortho") * c
    dims = (-2, -1)
    kspace = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(image, dim=dims), norm="ortho"), dim=dims) * mask
    zero_filled = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(kspace, dim=dims), norm="ortho"), dim=dims)
    return kspace, zero_filled
