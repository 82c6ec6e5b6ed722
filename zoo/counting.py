"""Parameter and FLOP counts of zoo models, shared by `zoo.summary`, `zoo.paper_reference` and the recipes.

FLOPs come from torch.utils.flop_counter, which counts 2 FLOPs per multiply-accumulate (MAC) of matmuls,
convolutions and attention; FFTs, normalisations and elementwise ops are not counted. The forward runs on
a meta-device copy of the model, so only shapes are computed and a 56 M-parameter U-Net at 320×320 costs
well under a second.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Distinct parameter elements (shared parameters counted once; frozen ones included)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: int | tuple[int, int]) -> int:
    """Forward FLOPs (2·MAC) of one 2×H×W slice (`size` = H = W, or (H, W)), on a meta-device copy of `model`."""
    import zoo

    hw = (size, size) if isinstance(size, int) else tuple(size)
    meta = copy.deepcopy(model).to("meta").eval()
    inputs = zoo.example_inputs(meta, hw, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(*inputs)
    return counter.get_total_flops()
