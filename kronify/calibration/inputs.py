"""Input second moments of a layer, accumulated batch by batch so the calibration activations are never held.

The rows x come from the layer's `InputView` (kronify.layer_kinds: the input's last dim for a Linear, im2col
patches for Conv1d/Conv2d, a pixel's channel vector for Conv3d and ConvTranspose, query/key/value for
attention), so that the layer's output is W2 x with W2 the weight as a matrix (see kronify.kron_fit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from kronify.layer_kinds import InputView

__all__ = ["Moments", "input_rows"]


def input_rows(view: InputView, module: nn.Module, x: Tensor) -> Tensor:
    """The input tensor `x` of one call of `module` as rows (N, d) in float32, as `view` reads it."""
    x = x.detach()
    if view.kind == "linear":
        return x.reshape(-1, x.shape[-1]).float()
    if view.kind == "channels":
        return x.movedim(1, -1).reshape(-1, x.shape[1]).float()
    return _patches(module, x)


def _patches(conv: nn.Module, x: Tensor) -> Tensor:
    """im2col rows (N·L, in·kernel) of a Conv1d/Conv2d input, padded as the layer pads."""
    one_d = x.dim() == 3
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        x = Fn.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    pair = (lambda v: (1, v[0])) if one_d else tuple
    if one_d:
        x = x.unsqueeze(2)
    cols = Fn.unfold(x.float(), pair(conv.kernel_size), dilation=pair(conv.dilation), stride=pair(conv.stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


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
