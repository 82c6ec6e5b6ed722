"""fastMRI's own undersampling masks (``fastmri.data.subsample``), chosen by acceleration.

A thin layer that validates the request and returns fastMRI's mask function; the defaults are the
fastMRI challenge settings: 4x with 8% of the central columns, 8x with 4%.

Mask types are fastMRI's names (``fastmri.data.subsample.create_mask_for_mask_type``):
``"random"`` (RandomMaskFunc, the default; expected acceleration = nominal), ``"equispaced_fraction"``
(EquispacedMaskFractionFunc; equispaced lines adjusted so the acceleration matches the nominal one),
``"equispaced"`` (EquiSpacedMaskFunc; GRAPPA-style, samples more than nominal), ``"magic"`` and
``"magic_fraction"``. The mask covers the phase-encoding columns (the last spatial axis, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from fastmri.data.subsample import MaskFunc, create_mask_for_mask_type

__all__ = ["CENTER_FRACTIONS", "MASK_TYPES", "make_mask_func", "effective_acceleration"]

#: fastMRI's centre fraction for each standard acceleration.
CENTER_FRACTIONS: dict[int, float] = {4: 0.08, 8: 0.04}
MASK_TYPES = ("random", "equispaced", "equispaced_fraction", "magic", "magic_fraction")


def make_mask_func(
    accelerations: int | Sequence[int] = 4,
    center_fractions: float | Sequence[float] | None = None,
    mask_type: str = "random",
) -> MaskFunc:
    """fastMRI mask function for the given acceleration(s); several are drawn uniformly per call, as fastMRI does.

    ``center_fractions`` defaults to fastMRI's value for 4x (0.08) and 8x (0.04); any other acceleration
    needs an explicit centre fraction.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {MASK_TYPES}")
    accs = [accelerations] if isinstance(accelerations, (int, float)) else list(accelerations)
    if not accs:
        raise ValueError("accelerations is empty")
    for acc in accs:
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or acc != int(acc) or acc < 2:
            raise ValueError(f"unknown acceleration {acc!r}: an acceleration is an integer >= 2 (fastMRI uses 4 and 8)")
    accs = [int(a) for a in accs]
    if center_fractions is None:
        unknown = [a for a in accs if a not in CENTER_FRACTIONS]
        if unknown:
            raise ValueError(
                f"unknown acceleration {unknown[0]}: fastMRI defines centre fractions only for "
                f"{sorted(CENTER_FRACTIONS)}; pass center_fractions explicitly for other accelerations"
            )
        fracs = [CENTER_FRACTIONS[a] for a in accs]
    else:
        fracs = [center_fractions] if isinstance(center_fractions, (int, float)) else list(center_fractions)
        if len(fracs) != len(accs):
            raise ValueError(f"center_fractions {fracs} must have one value per acceleration {accs}")
    for acc, frac in zip(accs, fracs):
        if not 0 < frac <= 1.0 / acc:
            raise ValueError(f"center fraction {frac} for acceleration {acc} must lie in (0, 1/{acc}]")
    return create_mask_for_mask_type(mask_type, fracs, accs)


def effective_acceleration(mask: torch.Tensor) -> float:
    """Number of columns / number of sampled columns of a column mask (any shape with W entries)."""
    m = mask.reshape(-1)
    return float(m.numel() / m.sum().clamp_min(1))
