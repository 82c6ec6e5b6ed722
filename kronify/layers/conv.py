"""KronConv1d/2d/3d: nn.ConvNd with weight Σ_t A_t ⊗ F_t, F of shape (terms, out/n, in/groups/n, *kernel)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kronify.layers.base import KronMixin

__all__ = ["KronConv1d", "KronConv2d", "KronConv3d"]


class _KronConvNd(KronMixin):
    _dim_names = ("out_channels", "in_channels/groups")
    _desc_attrs = ("in_channels", "out_channels", "groups")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        n: int = 2,
        terms: int | None = None,
        algebra: str = "learned",
    ) -> None:
        self._dense_cls.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device="meta", dtype=dtype,
        )
        self._kron_setup(n, terms, algebra, device, dtype)


class KronConv1d(_KronConvNd, nn.Conv1d):
    """Drop-in nn.Conv1d (same arguments) plus keyword-only n, terms (default n) and algebra."""

    _dense_cls = nn.Conv1d


class KronConv2d(_KronConvNd, nn.Conv2d):
    """Drop-in nn.Conv2d (same arguments) plus keyword-only n, terms (default n) and algebra."""

    _dense_cls = nn.Conv2d


class KronConv3d(_KronConvNd, nn.Conv3d):
    """Drop-in nn.Conv3d (same arguments) plus keyword-only n, terms (default n) and algebra."""

    _dense_cls = nn.Conv3d
