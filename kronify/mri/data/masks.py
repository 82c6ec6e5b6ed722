"""fastMRI's own undersampling masks (``fastmri.data.subsample``), chosen by acceleration.

A thin layer that validates the request and returns fastMRI's mask function; the defaults are the
fastMRI challenge settings: 4x with 8% of the central columns, 8x with 4%.

Mask types are fastMRI's names (``fastmri.data.subsample.create_mask_for_mask_type``):
``"random"`` (RandomMaskFunc, the default; expected acceleration = nominal), ``"equispaced_fraction"``
(EquispacedMaskFractionFunc; equispaced lines adjusted so the acceleration matches the nominal one),
``"equispaced"`` (EquiSpacedMaskFunc; GRAPPA-style, samples more than nominal), ``"magic"`` and
``"magic_fraction"``. The mask covers the phase-encoding columns (the last spatial axis, W).

:func:`draw_fixed_mask` draws the ONE mask the paper protocol uses for training and testing (the official
HyperKron masks are ``RandomMaskFunc`` with seed 0); :func:`load_or_save_mask` keeps it with the run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from fastmri.data.subsample import MaskFunc, create_mask_for_mask_type

__all__ = [
    "CENTER_FRACTIONS",
    "MASK_TYPES",
    "draw_fixed_mask",
    "effective_acceleration",
    "load_or_save_mask",
    "make_mask_func",
]

#: fastMRI's centre fraction for each standard acceleration (16x: the official HyperKron masks' 0.02).
CENTER_FRACTIONS: dict[int, float] = {4: 0.08, 8: 0.04, 16: 0.02}
MASK_TYPES = ("random", "equispaced", "equispaced_fraction", "magic", "magic_fraction")


def make_mask_func(
    accelerations: int | Sequence[int] = 4,
    center_fractions: float | Sequence[float] | None = None,
    mask_type: str = "random",
) -> MaskFunc:
    """fastMRI mask function for the given acceleration(s); several are drawn uniformly per call, as fastMRI does.

    ``center_fractions`` defaults to fastMRI's value for 4x (0.08) and 8x (0.04), and 0.02 at 16x (the
    official HyperKron 16x masks); any other acceleration needs an explicit centre fraction.
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


def draw_fixed_mask(
    width: int,
    acceleration: int,
    center_fraction: float | None = None,
    mask_type: str = "random",
    seed: int = 0,
) -> np.ndarray:
    """One column mask (float32, ``width`` entries, 1 = sampled) from fastMRI's mask function with ``seed``.

    With the defaults this is the official HyperKron mask: ``RandomMaskFunc`` over 320 columns with seed 0
    gives 39 lines at 8x (centre fraction 0.04) and 81 at 4x (0.08).
    """
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 2:
        raise ValueError(f"mask width must be an int >= 2, got {width!r}")
    fracs = None if center_fraction is None else [center_fraction]
    mask, _ = make_mask_func([acceleration], fracs, mask_type)((1, int(width), 1), None, seed)
    return mask.reshape(-1).numpy().astype(np.float32)


def load_or_save_mask(path: str | os.PathLike, mask: np.ndarray) -> np.ndarray:
    """Write ``mask`` to ``path`` (.npy) on first use; afterwards check that the saved one is the same.

    A saved mask that differs (other acceleration, width or seed) is an error naming the file, so a resumed
    or repeated run cannot silently train and test with different masks.
    """
    path = Path(path)
    mask = np.asarray(mask, dtype=np.float32).reshape(-1)
    if path.is_file():
        saved = np.load(path)
        if saved.shape != mask.shape or not np.array_equal(saved, mask):
            raise ValueError(
                f"mask file {path} holds a different mask ({int(saved.sum())} of {saved.size} columns) than the one "
                f"requested ({int(mask.sum())} of {mask.size}); use the same settings or delete the file"
            )
        return saved
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, mask)
    tmp.replace(path)
    return mask
