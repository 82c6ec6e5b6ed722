"""Learning-rate schedules of a training run, stepped once per optimizer step.

``multistep``: the paper's MultiStepLR (the rate halves at each milestone). ``cosine``: a linear warm-up from
0 over ``warmup`` steps to the base rate, then a half cosine down to 0 at ``total`` steps
(``torch.optim.lr_scheduler`` LinearLR then CosineAnnealingLR, chained with SequentialLR). Short runs (the
demo's few hundred steps) learn faster with the warm-up and a higher peak rate than with a constant rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR

__all__ = ["SCHEDULES", "make_schedule"]

SCHEDULES = ("multistep", "cosine")


def make_schedule(optimizer: torch.optim.Optimizer, name: str, *, total: int, milestones: Sequence[int] = (),
                  gamma: float = 0.5, warmup: int = 0) -> LRScheduler:
    """The ``name`` schedule for a run of ``total`` optimizer steps (see the module docstring)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {SCHEDULES}")
    if name == "multistep":
        return MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if total < 1 or not 0 <= warmup < total:
        raise ValueError(f"the cosine schedule needs total >= 1 steps and 0 <= warmup < total, "
                         f"got total {total}, warmup {warmup}")
    cosine = CosineAnnealingLR(optimizer, T_max=total - warmup)
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
