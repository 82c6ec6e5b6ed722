"""Model wrappers and the one call that runs a model on a batch.

- :func:`reconstruct` runs a zoo model on an :class:`~kronify.mri.data.transforms.MRISample` batch (MoDL also
  gets the mask and the k-space).
- :class:`ZeroFilledStart` makes a network start exactly at the zero-filled image (demo and tiny presets).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ZeroFilledStart", "reconstruct"]


def reconstruct(model: nn.Module, batch: Any) -> Tensor:
    """Run a zoo model on an :class:`~kronify.mri.data.transforms.MRISample` batch (MoDL also gets mask and k-space)."""
    if getattr(model, "needs_kspace", False):
        return model(batch.input, batch.mask, batch.kspace)
    return model(batch.input)


class ZeroFilledStart(nn.Module):
    """``x + gain·(f(x) − x)`` (or ``x + gain·f(x)`` when ``f`` predicts a correction), ``gain`` a learnable scalar
    starting at 0: the network's output starts *exactly* at the zero-filled image (ReZero/SkipInit-style).

    Randomly initialised reconstruction networks start far from the input (their first outputs have a
    mean-squared error 15–250× the zero-filled one on the demo data), and a short CPU run spends most of its
    steps getting back to it. This wrapper removes that phase; it adds one parameter and changes nothing else
    (the wrapped model, dense or Kronecker, is ``.model``). Used by the demo and tiny presets, not the paper one.

    ``gain_init`` 1 suits a model that already starts at its input (e.g. MoDL with ``denoiser_out_init`` near
    0): its output is then the model's own from the first step, and the gain no longer scales the network's
    updates down (the product of a small gain and a small output would learn slowly).
    """

    def __init__(self, model: nn.Module, correction: bool = False, gain_init: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(gain_init):
            raise ValueError(f"gain_init must be finite, got {gain_init}")
        self.model = model
        self.correction = bool(correction)
        self.gain = nn.Parameter(torch.tensor(float(gain_init)))

    @property
    def needs_kspace(self) -> bool:
        return bool(getattr(self.model, "needs_kspace", False))

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        y = self.model(x, *args)
        return x + self.gain * (y if self.correction else y - x)
