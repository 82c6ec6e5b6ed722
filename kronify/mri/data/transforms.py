"""One slice -> one :class:`MRISample` under a protocol (:mod:`kronify.mri.protocol`): :class:`MRITransform`.

The two protocols (``paper`` or ``fastmri``; the table in :mod:`kronify.mri.protocol` lists every difference):

- target = centre crop (default 320x320) of ``fastmri.ifft2c(kspace)`` under both;
- ``paper``: k-space = ``fastmri.fft2c(crop)``, the mask covers the crop's columns, zero-filled input =
  ``ifft2c(mask * fft2c(crop))``, ``scale`` = max |target| of the slice (the official code's normalisation);
- ``fastmri``: the mask covers the raw k-space's full width (368 on fastMRI knee), zero-filled input = centre
  crop of ``ifft2c(mask * kspace)``, ``scale`` = max |zero-filled| of the slice (known at inference time);
- masks: fastMRI's mask functions; one fixed mask for every sample (``mask=...``, the paper's default), or a
  new mask per training sample and masks fixed per file for validation/test, seeded with
  ``tuple(map(ord, fname))`` exactly as fastMRI's transforms do;
- input, target and k-space are divided by ``scale`` (multiply a network output by ``scale`` to get back to
  the file's units); ``max_value``, the metrics' data range, comes from the target that is scored: the
  slice's target max (``paper``) or the max over the scored slices of the volume (``fastmri``, computed by
  :class:`kronify.mri.data.datasets.SingleCoilSliceDataset` from k-space), never from the file's ``max`` attribute, which belongs to
  the crop the file was built with.

The chain is computed without shifted copies of the data or transforms of rows that the crop discards
(:func:`kronify.mri.complex.ifft2c_crop`, :func:`kronify.mri.complex.fft2c_masked`); the tests check it
against fastmri's own ``ifft2c`` / ``complex_center_crop`` / ``fft2c`` / ``apply_mask`` / ``ifft2c``.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import fastmri
import numpy as np
import torch
from torch import Tensor

from kronify.mri.data.augment import AugmentConfig, SliceAugment
from kronify.mri.complex import fft2c, fft2c_masked, from_complex, ifft2c, ifft2c_crop, to_complex
from kronify.mri.errors import DataError
from kronify.mri.data.masks import make_mask_func
from kronify.mri.protocol import Protocol, get_protocol

__all__ = ["VOLUME_MAX_KEY", "MRISample", "MRITransform", "crop_size", "crop_space_mask"]

#: attrs key through which :class:`kronify.mri.data.datasets.SingleCoilSliceDataset` hands the scored target volume's max to the transform
VOLUME_MAX_KEY = "kronify_volume_max"


class MRISample(NamedTuple):
    """One slice for reconstruction; the default collate stacks it into a batch.

    input:     float32 (2, H, W) zero-filled complex image (real, imag) / scale
    target:    float32 (2, H, W) target complex image (centre crop) / scale
    kspace:    float32 (2, H, W) masked k-space of the crop (fastmri.fft2c convention) / scale
    mask:      float32 (1, 1, W) sampled phase-encoding columns of the crop's k-space (1 = sampled)
    scale:     float32 () per-slice normalisation in the file's units: max |target| (paper protocol) or
               max |zero-filled image| (fastmri protocol)
    fname:     file name (no folder)
    slice_num: slice index in the file
    max_value: float32 () the metrics' data range in the file's units, from the scored target: this slice's
               target max (paper), or the max over the volume's scored slices (fastmri validation/test;
               training samples carry their slice's max)

    Under the fastmri protocol the mask is drawn over the raw k-space width; ``kspace``/``mask`` then describe
    the crop's k-space with each crop column marked sampled when its nearest raw column is (the crop's k-space
    is not a subset of the raw one, so a data-consistency model such as MoDL is approximate there). With
    training patches (``patch``) input and target are the patch while ``kspace``/``mask`` stay the slice's.
    """

    input: Tensor
    target: Tensor
    kspace: Tensor
    mask: Tensor
    scale: Tensor
    fname: str
    slice_num: int
    max_value: Tensor


def crop_size(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of a crop given as one int or a pair of positive ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in pair):
        raise ValueError(f"crop must be a positive int or a pair of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def _scaled_channels_first(z: Tensor, factor: Tensor) -> Tensor:
    """Complex (H, W) -> contiguous (real, imag) float32 (2, H, W), times ``factor``, in one pass."""
    out = torch.empty((2, *z.shape), dtype=torch.float32)
    return torch.mul(torch.view_as_real(z).movedim(-1, 0), factor, out=out)


def _check_patch(patch: int | None) -> int | None:
    if patch is not None and (isinstance(patch, bool) or not isinstance(patch, int) or patch < 1):
        raise ValueError(f"patch must be a positive int or None, got {patch!r}")
    return patch


def crop_space_mask(mask: Tensor, crop_width: int) -> Tensor:
    """A raw-width column mask (centred, W entries) carried onto the ``crop_width`` columns of the crop's
    k-space: each crop column takes the value of the raw column nearest to its frequency."""
    width = mask.numel()
    freq = (torch.arange(crop_width) - crop_width // 2) / crop_width
    nearest = (torch.round(freq * width).long() + width // 2).clamp(0, width - 1)
    return mask.reshape(-1)[nearest]


class MRITransform:
    """fastMRI-style transform ``(kspace, mask, target, attrs, fname, slice_num) -> MRISample`` under a protocol.

    Masks: ``mask`` (a column mask as long as the masked k-space is wide: the crop's width under ``paper``,
    the raw k-space's under ``fastmri``) is used for every sample. Without it, ``fixed_mask=False`` (training)
    draws a new mask per call, from a random state seeded once per process from ``torch.initial_seed()`` (so
    DataLoader workers draw different, reproducible masks) or per sample through :meth:`reseed`;
    ``fixed_mask=True`` (validation/test) seeds every call with the file name, so a volume gets the same mask
    in every epoch. ``patch`` (training only) cuts a random ``patch`` x ``patch`` window out of input and target
    after undersampling the whole slice, as the official code trains SwinMR (192x192).
    ``augment`` (a :class:`kronify.mri.data.augment.SliceAugment`, training only) varies the fully sampled complex
    image before it is masked: the image the k-space encodes (the whole field of view under ``fastmri``, the
    crop under ``paper``) is augmented and its k-space recomputed, so input, target and k-space stay
    consistent. :meth:`reseed` seeds it with the masks, so a sample's augmentation is fixed by its seed.
    """

    def __init__(
        self,
        crop: int | Sequence[int] = 320,
        accelerations: int | Sequence[int] = 4,
        center_fractions: float | Sequence[float] | None = None,
        mask_type: str = "random",
        fixed_mask: bool = False,
        *,
        protocol: str | Protocol = "fastmri",
        mask: np.ndarray | Tensor | None = None,
        patch: int | None = None,
        augment: SliceAugment | None = None,
    ):
        self.crop = crop_size(crop)
        self.protocol = get_protocol(protocol)
        self.mask_func = make_mask_func(accelerations, center_fractions, mask_type)
        self.fixed_mask = fixed_mask
        self.mask = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=np.float32)).reshape(-1)
        if self.mask is not None and self.protocol.mask_over == "crop" and self.mask.numel() != self.crop[1]:
            raise ValueError(f"the {self.protocol.name} protocol masks the crop's {self.crop[1]} columns, "
                             f"but the fixed mask has {self.mask.numel()}")
        self.patch = _check_patch(patch)
        self.augment = augment
        self._patch_rng = np.random.default_rng(0)
        self._seeded_pid: int | None = None

    @property
    def needs_volume_max(self) -> bool:
        """Whether samples need the scored target volume's max (fastmri protocol, validation/test)."""
        return self.protocol.metric_scope == "volume" and self.fixed_mask

    def with_patch(self, patch: int | None) -> MRITransform:
        """A copy of this transform that trains on random ``patch`` x ``patch`` windows (None: whole slices)."""
        other = copy.copy(self)
        other.mask_func = copy.deepcopy(self.mask_func)
        other.patch = _check_patch(patch)
        other._patch_rng = np.random.default_rng(0)
        other._seeded_pid = None
        other.augment = copy.deepcopy(self.augment)
        return other

    def with_augment(self, config: AugmentConfig | None, seed: int = 0) -> MRITransform:
        """A copy of this transform whose training samples are augmented with ``config`` before masking
        (None or a disabled config: no augmentation)."""
        other = self.with_patch(self.patch)
        other.augment = SliceAugment(config, seed) if config is not None and config.enabled else None
        return other

    def reseed(self, seed: int) -> None:
        """Seed the training mask draws and patch positions in this process (e.g. per sample for exactly
        resumable training)."""
        self.mask_func.rng.seed(seed % (2**32 - 1))
        self._patch_rng = np.random.default_rng(seed)
        if self.augment is not None:
            self.augment.reseed(seed)
        self._seeded_pid = os.getpid()

    def _mask_seed(self, fname: str) -> tuple[int, ...] | None:
        if self.fixed_mask:
            return tuple(map(ord, fname))
        if self._seeded_pid != os.getpid():
            self.reseed(torch.initial_seed())
        return None

    def target_image(self, kspace: Tensor) -> Tensor:
        """The complex target: centre crop of ``fastmri.ifft2c(kspace)`` (complex dtype, any leading dims)."""
        return ifft2c_crop(kspace, self.crop)

    def _column_mask(self, width: int, fname: str) -> Tensor:
        if self.mask is not None:
            if self.mask.numel() != width:
                raise DataError(f"{fname}: the fixed mask has {self.mask.numel()} columns but the "
                                f"{self.protocol.name} protocol masks {width} columns here")
            if not self.fixed_mask and self._seeded_pid != os.getpid():
                self.reseed(torch.initial_seed())  # patch positions
            return self.mask
        col_mask, _ = self.mask_func((1, width, 2), None, self._mask_seed(fname))  # as fastmri's apply_mask
        return col_mask.reshape(-1)

    def __call__(
        self,
        kspace: np.ndarray,
        mask: np.ndarray | None,
        target: np.ndarray | None,
        attrs: dict[str, Any],
        fname: str,
        slice_num: int,
    ) -> MRISample:
        height, width = kspace.shape[-2:]
        if self.crop[0] > height or self.crop[1] > width:
            raise DataError(f"crop {self.crop} is larger than the image {height}x{width} of {fname}")
        raw = torch.from_numpy(kspace)
        augmenting = self.augment is not None and not self.fixed_mask
        if augmenting and self._seeded_pid != os.getpid():
            self.reseed(torch.initial_seed())
        if augmenting and self.protocol.mask_over != "crop":  # fastmri: the raw k-space's whole field of view
            raw = to_complex(fft2c(self.augment(ifft2c(from_complex(raw)))))
        # computed without shifted copies or transforms of rows that the crop discards; equal up to float rounding
        # to fastmri's ifft2c / complex_center_crop / fft2c / apply_mask chain of each protocol (see the tests)
        target = self.target_image(raw)
        if augmenting and self.protocol.mask_over == "crop":  # paper: the crop is what gets masked
            target = self.augment(target)
        if self.protocol.mask_over == "crop":  # paper: mask the crop's own k-space
            col_mask = self._column_mask(self.crop[1], fname)
            masked_k, zero_filled = fft2c_masked(target, col_mask)
        else:  # fastmri: mask the raw k-space, then crop its inverse FFT
            raw_mask = self._column_mask(width, fname)
            zero_filled = ifft2c_crop(raw * raw_mask, self.crop)
            col_mask = crop_space_mask(raw_mask, self.crop[1])
            masked_k = torch.view_as_complex(fastmri.fft2c(torch.view_as_real(zero_filled))) * col_mask
        target_max = target.abs().max()
        scale = target_max if self.protocol.normalise_by == "target" else zero_filled.abs().max()
        if not (math.isfinite(s := float(scale)) and s > 0):  # an all-zero slice: leave it unscaled
            scale = torch.ones((), dtype=scale.dtype)
        max_value = float(attrs.get(VOLUME_MAX_KEY, target_max)) if self.needs_volume_max else float(target_max)
        inv = 1.0 / scale
        sample_input, sample_target = _scaled_channels_first(zero_filled, inv), _scaled_channels_first(target, inv)
        if self.patch is not None and not self.fixed_mask:
            sample_input, sample_target = self._cut_patch(sample_input, sample_target, fname)
        return MRISample(
            input=sample_input,
            target=sample_target,
            kspace=_scaled_channels_first(masked_k, inv),
            mask=col_mask.to(torch.float32).reshape(1, 1, -1),
            scale=scale.to(torch.float32),
            fname=fname,
            slice_num=int(slice_num),
            max_value=torch.tensor(max_value, dtype=torch.float32),
        )

    def _cut_patch(self, image: Tensor, target: Tensor, fname: str) -> tuple[Tensor, Tensor]:
        height, width = image.shape[-2:]
        if self.patch > min(height, width):
            raise DataError(f"training patch {self.patch} is larger than the {height}x{width} crop of {fname}")
        top = int(self._patch_rng.integers(0, height - self.patch + 1))
        left = int(self._patch_rng.integers(0, width - self.patch + 1))
        window = (..., slice(top, top + self.patch), slice(left, left + self.patch))
        return image[window].contiguous(), target[window].contiguous()
