"""What a layer multiplies its weight with: its inputs as rows x, in the order of the weight's columns.

For each kind of layer, `input_view` says how a call's inputs become rows X (N, d) so that the layer's output
is W2 x with W2 the weight as a matrix (see kronify.kron_fit), and `Moments` accumulates Σ x xᵀ, Σ x and N
batch by batch, so the activations of the calibration set are never held.

- Linear: x is the input's last dim. transformers' Conv1D stores W as (in, out): `transposed`.
- Conv1d/Conv2d (groups = 1): x is the im2col patch (in·kernel), taken with the layer's own padding.
- Conv3d and ConvTranspose (groups = 1): x is a pixel's channel vector, and the metric over (in, kernel) is
  C_channels ⊗ I (spatial correlations left out; a transposed conv's weight is (in, out, k): `transposed`).
- nn.MultiheadAttention: one view per projection, fed by query, key or value.
Grouped convs have no view here (their rows see different inputs); they keep the weight-only fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from kronify.layer_kinds import is_hf_conv1d

__all__ = ["InputView", "Moments", "input_view", "unsupported_reason"]

_MHA_SOURCES = {"in_proj_weight": (0, 1, 2), "q_proj_weight": (0,), "k_proj_weight": (1,), "v_proj_weight": (2,)}


@dataclass
class InputView:
    """How to read one weight's inputs from a call of its layer.

    sources: per chunk of dim 0, which positional input (query 0, key 1, value 2) feeds it; kernel: size of
    the kernel dims the metric is the identity over (channel-only metric), 1 otherwise; transposed: the
    weight's first two dims are (in, out)."""

    kind: str
    sources: tuple[int, ...]
    kernel: int = 1
    transposed: bool = False

    @property
    def taps_are_outputs(self) -> bool:
        """A transposed conv's kernel taps write different output pixels (see Moments.covariance)."""
        return self.transposed and self.kernel > 1

    def rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input tensor `x` of one call as rows (N, d) in float32."""
        x = x.detach()
        if self.kind == "linear":
            return x.reshape(-1, x.shape[-1]).float()
        if self.kind == "channels":
            return x.movedim(1, -1).reshape(-1, x.shape[1]).float()
        return _patches(module, x)


def _patches(conv: nn.Module, x: Tensor) -> Tensor:
    """im2col rows (N·L, in·kernel) of a Conv1d/Conv2d input, padded as the layer pads."""
    one_d = x.dim() == 3
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(pad):
        x = Fn.pad(x, pad, mode=mode)
    pair = (lambda v: (1, v[0])) if one_d else (lambda v: tuple(v))
    if one_d:
        x = x.unsqueeze(2)
    cols = Fn.unfold(x.float(), pair(conv.kernel_size), dilation=pair(conv.dilation), stride=pair(conv.stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def unsupported_reason(module: nn.Module) -> str:
    """Why `module`'s inputs give no metric ("" when they do)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return "grouped conv: its output rows see different inputs"
    if isinstance(module, nn.Embedding):
        return "an embedding's inputs are token ids: it keeps the fit to its weights"
    if isinstance(module, nn.MultiheadAttention) or isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return ""
    return "" if is_hf_conv1d(module) else f"{type(module).__name__} inputs are not read"


def input_view(module: nn.Module, tensor: str, chunks: int) -> InputView:
    """The InputView of `module.<tensor>` (call `unsupported_reason` first)."""
    if isinstance(module, nn.MultiheadAttention):
        return InputView("linear", _MHA_SOURCES[tensor])
    if is_hf_conv1d(module):
        return InputView("linear", (0,) * chunks, transposed=True)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return InputView("channels", (0,), math.prod(module.kernel_size), transposed=True)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return InputView("patches", (0,))
    if isinstance(module, nn.modules.conv._ConvNd):
        return InputView("channels", (0,), math.prod(module.kernel_size))
    return InputView("linear", (0,) * chunks)


class Moments:
    """Second moments of the rows added so far, accumulated around a reference row r (the first batch's mean):
    Σ (x − r)(x − r)ᵀ and Σ (x − r) in float64, and the count N. Shifting by r keeps the covariance accurate
    when the inputs' mean is large against their spread (a float32 Σ x xᵀ would cancel away its digits)."""

    def __init__(self) -> None:
        self.S: Tensor | None = None
        self.s: Tensor | None = None
        self.ref: Tensor | None = None
        self.N = 0

    def add(self, X: Tensor) -> None:
        if X.shape[0] == 0:
            return
        if self.S is None:
            d = X.shape[1]
            self.ref = X.mean(0)
            self.S = torch.zeros(d, d, dtype=torch.float64, device=X.device)
            self.s = torch.zeros(d, dtype=torch.float64, device=X.device)
        X = X - self.ref
        self.S += (X.T @ X).double()
        self.s += X.sum(0).double()
        self.N += X.shape[0]

    @property
    def empty(self) -> bool:
        return self.N == 0

    def covariance(self, kernel: int = 1, taps_are_outputs: bool = False) -> tuple[Tensor, Tensor]:
        """(Σ, mean) of the rows the weight's columns see, from the per-pixel moments, with the kernel taps
        uncorrelated: when the taps read neighbouring pixels (a Conv3d) the columns' covariance is Σ ⊗ I and
        their mean the pixel mean repeated; when each tap writes its own output pixel (a ConvTranspose) the
        error adds up over the taps, which is the second moment E[x xᵀ] ⊗ I with mean 0."""
        if self.empty:
            raise ValueError("Moments: no rows were added")
        shift = self.s / self.N
        cov = self.S / self.N - torch.outer(shift, shift)
        mean = self.ref.double() + shift
        if taps_are_outputs:
            cov, mean = cov + torch.outer(mean, mean), torch.zeros_like(mean)
        if kernel > 1:
            cov = torch.kron(cov, torch.eye(kernel, dtype=cov.dtype, device=cov.device))
            mean = mean.repeat_interleave(kernel)
        return cov, mean

    def metric(self, kernel: int, centred: bool, taps_are_outputs: bool = False) -> tuple[Tensor, Tensor]:
        """(C, mean): the covariance (centred) or the second moment E[x xᵀ] (not centred), and the mean row."""
        cov, mean = self.covariance(kernel, taps_are_outputs)
        return (cov if centred else cov + torch.outer(mean, mean)), mean
