"""Kronecker (PHM) drop-in replacements for torch's Linear / Conv / ConvTranspose layers."""

from torch import nn

from kronify.layers.base import KronMixin, kron_param_count
from kronify.layers.conv import KronConv1d, KronConv2d, KronConv3d
from kronify.layers.conv_transpose import KronConvTranspose1d, KronConvTranspose2d, KronConvTranspose3d
from kronify.layers.linear import KronLinear

#: torch layer class -> its Kronecker replacement (exact classes; subclasses are the caller's call).
KRON_LAYER_FOR: dict[type, type] = {
    nn.Linear: KronLinear,
    nn.Conv1d: KronConv1d,
    nn.Conv2d: KronConv2d,
    nn.Conv3d: KronConv3d,
    nn.ConvTranspose1d: KronConvTranspose1d,
    nn.ConvTranspose2d: KronConvTranspose2d,
    nn.ConvTranspose3d: KronConvTranspose3d,
}

__all__ = [
    "KRON_LAYER_FOR",
    "KronMixin",
    "KronLinear",
    "KronConv1d",
    "KronConv2d",
    "KronConv3d",
    "KronConvTranspose1d",
    "KronConvTranspose2d",
    "KronConvTranspose3d",
    "kron_param_count",
]
