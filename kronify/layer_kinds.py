"""The kinds of layer kronify converts, in one table (`KINDS`): adding a kind of layer touches only this file.

`kind_of(module)` finds a module's `LayerKind`: the first matching entry wins, so subclasses come before their bases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["InputView", "KINDS", "LayerKind", "is_hf_conv1d", "kind_of", "weight_names"]


@dataclass
class InputView:
    """How one weight's inputs are read from a call of its layer, as rows x with output = W2 x.

    kind: "linear" (the input's last dim), "patches" (im2col of a Conv1d/Conv2d input, padded as the layer
    pads) or "channels" (a pixel's channel vector; the metric over the kernel taps is then C ⊗ I); sources: per
    chunk of dim 0, which positional input (query 0, key 1, value 2) feeds it; kernel: the number of kernel taps
    of a "channels" view; transposed: the weight's first two dims are (in, out). The rows themselves are read by
    kronify.calibration.inputs.input_rows."""

    kind: str
    sources: tuple[int, ...]
    kernel: int = 1
    transposed: bool = False

    @property
    def taps_are_outputs(self) -> bool:
        """A transposed conv's kernel taps write different output pixels (see Moments.covariance)."""
        return self.transposed and self.kernel > 1


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer: which modules it covers (`matches`), which weights their forward reads and into how many
    chunks dim 0 splits (`weights`: nn.MultiheadAttention's packed q/k/v), the names of the weights' first two dims
    (`dims`, for messages), which bias belongs to a weight (`bias`) and why a module cannot take a computed weight
    (`problem`). `view` says how a call's inputs meet a weight (module, tensor, chunks -> InputView), or why the
    calibrated fit cannot read them (a string); `optional`: converted only with KronConfig.embeddings;
    `reads_weight_often`: the forward reads a weight several times, so it is built once per call; `ties_heads`:
    Linear output heads may hold the same weight (tied embeddings) and then share its factors."""

    name: str
    matches: Callable[[nn.Module], bool]
    weights: Callable[[nn.Module], list[tuple[str, int]]]
    dims: Callable[[nn.Module, str], tuple[str, str]]
    view: Callable[[nn.Module, str, int], InputView | str]
    problem: Callable[[nn.Module], str] = lambda m: ""
    bias: Callable[[nn.Module, str], Tensor | None] = lambda m, tensor: m._parameters.get("bias")
    optional: bool = False
    reads_weight_often: bool = False
    ties_heads: bool = False


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and relatives): a Linear whose weight is stored (in, out)."""
    return any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers") for k in type(module).__mro__)


def _embedding_problem(module: nn.Embedding) -> str:
    """max_norm renormalises rows of the weight in place during forward; sparse gradients need a leaf weight."""
    if module.max_norm is not None:
        return "embedding with max_norm (its forward renormalises the weight in place)"
    return "embedding with sparse=True (sparse gradients need a plain weight)" if module.sparse else ""


_QKV = {"in_proj_weight": (0, 1, 2), "q_proj_weight": (0,), "k_proj_weight": (1,), "v_proj_weight": (2,)}
_MHA_IN_DIMS = {"k_proj_weight": "kdim", "v_proj_weight": "vdim"}


def _mha_weights(m: nn.MultiheadAttention) -> list[tuple[str, int]]:
    return [("in_proj_weight", 3)] if m._qkv_same_embed_dim else [(k, 1) for k in list(_QKV)[1:]]


def _mha_bias(m: nn.MultiheadAttention, tensor: str) -> Tensor | None:
    """The packed in_proj_bias, or its q/k/v slice for a separate projection weight."""
    b = m._parameters.get("in_proj_bias")
    return b if b is None or tensor == "in_proj_weight" else b.data.chunk(3)[_QKV[tensor][0]]


def _grouped(view: Callable[[nn.Module], InputView]) -> Callable[[nn.Module, str, int], InputView | str]:
    return lambda m, tensor, chunks: "grouped conv: its output rows see different inputs" if m.groups > 1 else view(m)


_WEIGHT = lambda m: [("weight", 1)]  # noqa: E731 (one name read by the forward, in one chunk)
_CONV_DIMS = lambda m, tensor: ("out_channels", "in_channels/groups")  # noqa: E731

KINDS: list[LayerKind] = [
    LayerKind("embedding", lambda m: isinstance(m, nn.Embedding), _WEIGHT,
              lambda m, tensor: ("num_embeddings", "embedding_dim"),
              lambda m, tensor, chunks: "an embedding's inputs are token ids: it keeps the fit to its weights",
              problem=_embedding_problem, bias=lambda m, tensor: None, optional=True, ties_heads=True),
    LayerKind("attention", lambda m: isinstance(m, nn.MultiheadAttention), _mha_weights,
              lambda m, tensor: ("embed_dim", _MHA_IN_DIMS.get(tensor, "embed_dim")),
              lambda m, tensor, chunks: InputView("linear", _QKV[tensor]), bias=_mha_bias, reads_weight_often=True),
    LayerKind("conv_transpose", lambda m: isinstance(m, nn.modules.conv._ConvTransposeNd), _WEIGHT,
              lambda m, tensor: ("in_channels", "out_channels/groups"),
              _grouped(lambda m: InputView("channels", (0,), math.prod(m.kernel_size), transposed=True))),
    LayerKind("conv", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d)), _WEIGHT, _CONV_DIMS,
              _grouped(lambda m: InputView("patches", (0,)))),
    LayerKind("conv3d", lambda m: isinstance(m, nn.modules.conv._ConvNd), _WEIGHT, _CONV_DIMS,
              _grouped(lambda m: InputView("channels", (0,), math.prod(m.kernel_size)))),
    LayerKind("hf_conv1d", is_hf_conv1d, _WEIGHT, lambda m, tensor: ("in_features", "out_features"),
              lambda m, tensor, chunks: InputView("linear", (0,) * chunks, transposed=True)),
    LayerKind("linear", lambda m: isinstance(m, nn.Linear), _WEIGHT, lambda m, tensor: ("out_features", "in_features"),
              lambda m, tensor, chunks: InputView("linear", (0,) * chunks)),
]


def kind_of(module: nn.Module) -> LayerKind | None:
    """The first entry of `KINDS` that covers `module`, or None."""
    return next((k for k in KINDS if k.matches(module)), None)


def weight_names(module: nn.Module, embeddings: bool = False) -> list[tuple[str, int]]:
    """(tensor name, chunks of dim 0) of the weights `module`'s forward reads; [] for other modules (and for
    optional kinds, nn.Embedding, unless `embeddings`)."""
    kind = kind_of(module)
    return [] if kind is None or (kind.optional and not embeddings) else kind.weights(module)
