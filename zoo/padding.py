"""Pad an image batch so H and W are multiples of a block size, and crop it back.

Window attention needs H, W divisible by the window; an encoder with five stride-2 stages needs
multiples of 32. Models pad on the bottom/right, run, and crop, so any H×W goes in and out unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_amount(size: int, multiple: int) -> int:
    """How many rows/columns make `size` a multiple of `multiple` (0 if it already is)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return (-size) % multiple


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dims of `x` (…, H, W) on the bottom/right up to multiples of `multiple`.

    `mode` is an F.pad mode; "reflect" falls back to "replicate" when the pad is not smaller than
    the dim (reflect cannot pad more than size - 1). Returns (padded, (H, W)) for `crop_to`.
    """
    h, w = x.shape[-2:]
    ph, pw = pad_amount(h, multiple), pad_amount(w, multiple)
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    if mode == "constant":
        return F.pad(x, (0, pw, 0, ph)), (h, w)
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the last two dims of `x` to `size` (the top-left block), undoing `pad_to_multiple`."""
    return x[..., : size[0], : size[1]]
