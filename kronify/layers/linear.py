"""KronLinear: nn.Linear with weight Σ_t A_t ⊗ F_t, F of shape (terms, out/n, in/n)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kronify.layers.base import KronMixin

__all__ = ["KronLinear"]


class KronLinear(KronMixin, nn.Linear):
    """Drop-in nn.Linear (same arguments) plus keyword-only n, terms (default n) and algebra."""

    _dense_cls = nn.Linear
    _dim_names = ("out_features", "in_features")
    _desc_attrs = ("in_features", "out_features")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        n: int = 2,
        terms: int | None = None,
        algebra: str = "learned",
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device="meta", dtype=dtype)
        self._kron_setup(n, terms, algebra, device, dtype)
