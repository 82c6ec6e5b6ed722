"""Independent numpy references for the MRI tests: centred orthonormal FFTs, centre crops, complex views."""

from __future__ import annotations

import numpy as np
import torch


def np_fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def np_ifft2c(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def np_crop(x: np.ndarray, size: int) -> np.ndarray:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def complex_np(x: torch.Tensor) -> np.ndarray:
    """A (2, H, W) real/imaginary tensor as a complex128 array."""
    return x[0].double().numpy() + 1j * x[1].double().numpy()
