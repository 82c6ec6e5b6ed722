"""KronConvTranspose1d/2d/3d: the weight keeps torch's (in, out/groups, *kernel) layout.

The Kronecker factorization is over those two dims as laid out, so F has shape
(terms, in/n, out/groups/n, *kernel). With a fixed algebra, the transposed op applies A_tᵀ, i.e. the
product by the conjugate element (still a complex / Hamilton product).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kronify.layers.base import KronMixin

__all__ = ["KronConvTranspose1d", "KronConvTranspose2d", "KronConvTranspose3d"]


class _KronConvTransposeNd(KronMixin):
    _dim_names = ("in_channels", "out_channels/groups")
    _desc_attrs = ("in_channels", "out_channels", "groups")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: Any = 1,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        n: int = 2,
        terms: int | None = None,
        algebra: str = "learned",
    ) -> None:
        self._dense_cls.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device="meta", dtype=dtype,
        )
        self._kron_setup(n, terms, algebra, device, dtype)


class KronConvTranspose1d(_KronConvTransposeNd, nn.ConvTranspose1d):
    """Drop-in nn.ConvTranspose1d (same arguments) plus keyword-only n, terms (default n) and algebra."""

    _dense_cls = nn.ConvTranspose1d


class KronConvTranspose2d(_KronConvTransposeNd, nn.ConvTranspose2d):
    """Drop-in nn.ConvTranspose2d (same arguments) plus keyword-only n, terms (default n) and algebra."""

    _dense_cls = nn.ConvTranspose2d


class KronConvTranspose3d(_KronConvTransposeNd, nn.ConvTranspose3d):
    """Drop-in nn.ConvTranspose3d (same arguments) plus keyword-only n, terms (default n) and algebra."""

    _dense_cls = nn.ConvTranspose3d
