"""Exponential moving average (EMA) of a model's weights, the copy used for validation and testing.

SwinMR keeps an EMA of the generator with decay 0.999 (``E_decay``) and evaluates that copy; so do we.
With a fixed decay of 0.999 the average starts at the random initial weights and needs ~1000 steps to forget
them, far longer than a CPU demo runs. We therefore use an explicit *warm-up*: the decay at update ``t``
(counting from 0) is

    d_t = min(decay, (1 + t) / (10 + t))

(TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule), so early averages follow the weights
closely and the decay reaches 0.999 after ~9000 updates. ``warmup=False`` gives the plain fixed-decay EMA.

Floating-point parameters are averaged; buffers (e.g. BatchNorm running statistics) are copied from the
live model, as timm's ``ModelEmaV2`` does. The update counter is a buffer, so the EMA's whole state lives in
its ``state_dict`` and travels with checkpoints.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """An EMA copy of ``model`` (``.module``), frozen and always in eval mode.

    Args:
        model: the live model; it is deep-copied, not modified.
        decay: the target decay (SwinMR: 0.999); 0 makes the EMA a copy of the latest weights.
        warmup: use ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        """The averaged copy stays in eval mode (Lightning toggles every submodule at fit start)."""
        super().train(False)
        return self

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        t = int(self.num_updates)
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema ← d·ema + (1 − d)·model for parameters; buffers copied."""
        d = self.current_decay()
        live = dict(model.named_parameters())
        for name, p_ema in self.module.named_parameters():
            p = live.get(name)
            if p is None:
                raise KeyError(f"EMA parameter {name!r} has no counterpart in the live model")
            if p_ema.dtype.is_floating_point:
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - d)
            else:
                p_ema.copy_(p)
        live_buffers = dict(model.named_buffers())
        for name, b_ema in self.module.named_buffers():
            if name in live_buffers:
                b_ema.copy_(live_buffers[name])
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
