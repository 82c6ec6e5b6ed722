"""kronify: make any PyTorch network parameter-efficient with Kronecker (PHM) layers, W = Σ_i A_i ⊗ F_i."""

# Importing each function after its submodule rebinds e.g. `kronify.convert` (the attribute) from
# the submodule to the function.
from kronify.convert import convert
from kronify.io import load, save
from kronify.kron import kron_weight, nearest_kronecker
from kronify.layers import (
    KRON_LAYER_FOR,
    KronConv1d,
    KronConv2d,
    KronConv3d,
    KronConvTranspose1d,
    KronConvTranspose2d,
    KronConvTranspose3d,
    KronLinear,
    kron_param_count,
)
from kronify.layers.attention import KronMultiheadAttention
from kronify.merge import merge
from kronify.report import ConversionReport

__version__ = "0.1.0"

__all__ = [
    "KRON_LAYER_FOR",
    "ConversionReport",
    "KronConv1d",
    "KronConv2d",
    "KronConv3d",
    "KronConvTranspose1d",
    "KronConvTranspose2d",
    "KronConvTranspose3d",
    "KronLinear",
    "KronMultiheadAttention",
    "convert",
    "kron_param_count",
    "kron_weight",
    "load",
    "merge",
    "nearest_kronecker",
    "save",
]
