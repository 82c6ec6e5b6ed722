"""The datasets of a run: fastMRI's ``SliceDataset`` per folder (:class:`SingleCoilSliceDataset`), a split pooled
over the folders (:class:`SplitDataset`), some of its slices (:class:`SliceSubset`), :func:`build_datasets` (the
train/val/test datasets of a split) and :func:`evaluation_dataset` (the slices a finished run is scored on). Both
builders check the volumes with the same helpers (:func:`check_crop_fits`, :func:`fixed_mask_width`).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as etree
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from fastmri.data import SliceDataset

from kronify.mri.data.masks import draw_fixed_mask, load_or_save_mask, make_mask_func
from kronify.mri.data.transforms import VOLUME_MAX_KEY, MRITransform, crop_size
from kronify.mri.data.volumes import (
    DEFAULT_ACQUISITIONS,
    DEMO_MANIFEST,
    DEMO_SPLIT,
    FASTMRI_SPLIT,
    SPLITS,
    Volume,
    central_slices,
    data_folders,
    load_or_make_split,
    scan_volumes,
)
from kronify.mri.errors import DataError
from kronify.mri.protocol import Protocol, get_protocol

__all__ = ["SingleCoilSliceDataset", "SliceSubset", "SplitDataset", "build_datasets", "check_crop_fits",
           "evaluation_dataset", "fixed_mask_width"]


def check_crop_fits(crop: tuple[int, int], volumes: Sequence[Volume]) -> None:
    """Raise :class:`DataError` naming the first volume whose image is smaller than ``crop``."""
    for volume in volumes:
        height, width = volume.shape
        if crop[0] > height or crop[1] > width:
            raise DataError(f"crop {crop} is larger than the image {height}x{width} of {volume.path}")


def fixed_mask_width(protocol: Protocol, crop: tuple[int, int], volumes: Sequence[Volume], what: str,
                     advice: str) -> int:
    """The columns one fixed mask spans: the crop's under a protocol that masks the crop, else the raw k-space
    width, which ``volumes`` (``what`` names them in the error) must then share."""
    if protocol.mask_over == "crop":
        return crop[1]
    widths = {v.shape[1] for v in volumes}
    if len(widths) != 1:
        raise DataError(f"one fixed mask over the raw k-space needs one k-space width, but {what} have "
                        f"{sorted(widths)} columns; {advice}")
    return widths.pop()


class SingleCoilSliceDataset(SliceDataset):
    """fastMRI's ``SliceDataset`` (challenge "singlecoil") over one folder, limited to ``files`` and the
    central ``num_slices`` slices of each volume. Read errors name the file.

    ``read_target=False`` passes ``target=None`` to the transform instead of reading the slice of
    ``reconstruction_esc`` (a quarter of the read time): :class:`MRITransform` computes the complex target
    from k-space, whose magnitude is ``reconstruction_esc``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        files: Collection[str],
        transform: Callable | None = None,
        num_slices: int | None = 20,
        read_target: bool = True,
    ):
        self.files = frozenset(files)
        self.num_slices = num_slices
        self.folder = Path(folder)
        super().__init__(
            folder,
            challenge="singlecoil",
            transform=transform,
            use_dataset_cache=False,
            raw_sample_filter=self._keep,
        )
        if not read_target:
            self.recons_key = "kronify: target not read"  # SliceDataset reads hf[recons_key] only if present

    def _retrieve_metadata(self, fname):
        if Path(fname).name not in self.files:
            return {}, 0
        try:
            metadata, num_slices = super()._retrieve_metadata(fname)
        except (OSError, KeyError, ValueError, RuntimeError, etree.ParseError) as err:
            raise DataError(f"cannot read the header of {fname}: {type(err).__name__}: {err}") from err
        metadata["num_slices"] = num_slices
        return metadata, num_slices

    def _keep(self, raw_sample) -> bool:
        return raw_sample.slice_ind in central_slices(raw_sample.metadata["num_slices"], self.num_slices)

    def __getitem__(self, i: int):
        fname, slice_ind, metadata = self.raw_samples[i]
        try:
            if getattr(self.transform, "needs_volume_max", False) and VOLUME_MAX_KEY not in metadata:
                # one dict per file, shared by its slices: computed once per file and process
                metadata[VOLUME_MAX_KEY] = self.volume_max(fname)
            return super().__getitem__(i)
        except (OSError, KeyError) as err:
            raise DataError(f"cannot read slice {slice_ind} of {fname}: {type(err).__name__}: {err}") from err

    def volume_max(self, fname: str | os.PathLike) -> float:
        """Max target magnitude over this dataset's slices of ``fname``: the data range of fastMRI's volume
        metrics for the target that is actually scored (the transform's crop of those slices)."""
        fname = Path(fname)
        slices = sorted(s.slice_ind for s in self.raw_samples if Path(s.fname) == fname)
        if not slices:
            raise DataError(f"{fname} has no slices in this dataset")
        with h5py.File(fname, "r") as hf:
            kspace = hf["kspace"][slices[0] : slices[-1] + 1][[s - slices[0] for s in slices]]
        return float(self.transform.target_image(torch.from_numpy(kspace)).abs().max())


class SplitDataset(torch.utils.data.ConcatDataset):
    """The slices of one split, pooled over the data folders (one :class:`SingleCoilSliceDataset` each)."""

    def __init__(
        self,
        split: str,
        folders: Sequence[Path],
        files: Collection[str],
        transform: MRITransform,
        num_slices: int | None = 20,
        skipped: Sequence[tuple[Path, str]] = (),
    ):
        datasets = [
            SingleCoilSliceDataset(folder, files, transform, num_slices, read_target=False) for folder in folders
        ]
        super().__init__([d for d in datasets if len(d)] or datasets[:1])
        self.split = split
        self.files = sorted(files)
        self.transform = transform
        self.num_slices = num_slices
        self.skipped = list(skipped)

    @property
    def raw_samples(self) -> list:
        """fastMRI's (fname, slice_ind, metadata) records of every slice, in dataset order."""
        return [s for d in self.datasets for s in d.raw_samples]

    @property
    def protocol(self) -> Protocol:
        """The protocol of this split's transform (how its slices are sampled and scored)."""
        return self.transform.protocol

    def with_transform(self, transform: MRITransform, files: Collection[str] | None = None) -> SplitDataset:
        """The same split (or only ``files`` of it) read through another transform (e.g. with training patches)."""
        folders = sorted({d.folder for d in self.datasets})
        return SplitDataset(self.split, folders, self.files if files is None else files, transform,
                            self.num_slices, self.skipped)


class SliceSubset(torch.utils.data.Subset):
    """Some slices of a :class:`SplitDataset` (the paper protocol draws training subsets by slice); keeps the
    attributes the training code reads (``transform``, ``files``, ``raw_samples``, ``protocol``)."""

    def __init__(self, dataset: SplitDataset, indices: Sequence[int]):
        super().__init__(dataset, sorted(int(i) for i in indices))
        records = dataset.raw_samples
        self.raw_samples = [records[i] for i in self.indices]
        self.files = sorted({Path(r.fname).name for r in self.raw_samples})
        self.split, self.transform, self.skipped = dataset.split, dataset.transform, dataset.skipped

    @property
    def protocol(self) -> Protocol:
        return self.transform.protocol

    def with_transform(self, transform: MRITransform) -> SliceSubset:
        """The same slices read through another transform (e.g. with training patches)."""
        return SliceSubset(self.dataset.with_transform(transform), self.indices)


def build_datasets(
    root: str | os.PathLike,
    split_file: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    split: Sequence[float] | None = None,
    seed: int = 0,
    acquisitions: Collection[str] | None = DEFAULT_ACQUISITIONS,
    num_slices: int | None = 20,
    crop: int | Sequence[int] = 320,
    accelerations: int | Sequence[int] = 4,
    center_fractions: float | Sequence[float] | None = None,
    mask_type: str = "random",
    on_corrupt: str = "raise",
    protocol: str | Protocol = "fastmri",
    fixed_mask: bool | None = None,
    mask_file: str | os.PathLike | None = None,
) -> dict[str, SplitDataset]:
    """Datasets for the requested splits under ``protocol`` (``"paper"`` or ``"fastmri"``,
    :mod:`kronify.mri.protocol`).

    ``fixed_mask`` (default: the protocol's, True for ``paper``) uses ONE mask, drawn with the protocol's
    seed, for every split; it is saved to ``mask_file`` (default: ``mask_<type>_<acc>x.npy`` next to the split
    file) and checked against it afterwards. Otherwise training masks vary per sample and validation/test
    masks are fixed per file. ``split`` defaults to :data:`DEMO_SPLIT` ratios when ``root`` is a kronify demo
    dataset (it holds ``kronify_demo.json``) and to fastMRI's :data:`FASTMRI_SPLIT` volume counts otherwise.
    The split JSON ``split_file`` is written on first use and reused afterwards.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; choose from {SPLITS}")
    crop = crop_size(crop)
    protocol = get_protocol(protocol)
    if num_slices is not None and num_slices < 1:
        raise ValueError(f"num_slices must be >= 1 or None (all slices), got {num_slices}")
    make_mask_func(accelerations, center_fractions, mask_type)  # validates before any file is read
    index = scan_volumes(root, acquisitions, on_corrupt)
    if split is None:
        split = DEMO_SPLIT if (Path(root) / DEMO_MANIFEST).is_file() else FASTMRI_SPLIT
    parts = load_or_make_split(split_file, index, split, seed, acquisitions)
    volumes = index.by_name()
    check_crop_fits(crop, [volumes[f] for name in splits for f in parts[name]])
    mask = None
    if protocol.fixed_mask if fixed_mask is None else fixed_mask:
        mask = _fixed_mask(protocol, crop, [volumes[f] for name in splits for f in parts[name]], accelerations,
                           center_fractions, mask_type, mask_file or Path(split_file).parent)
    transforms = {
        name: MRITransform(crop, accelerations, center_fractions, mask_type, fixed_mask=name != "train",
                           protocol=protocol, mask=mask)
        for name in splits
    }
    folders = data_folders(root)
    return {
        name: SplitDataset(name, folders, parts[name], transforms[name], num_slices, index.skipped) for name in splits
    }


def _fixed_mask(
    protocol: Protocol,
    crop: tuple[int, int],
    volumes: Sequence[Volume],
    accelerations: int | Sequence[int],
    center_fractions: float | Sequence[float] | None,
    mask_type: str,
    mask_file: str | os.PathLike,
) -> np.ndarray:
    """The one mask of a fixed-mask run, drawn over the columns the protocol masks, saved with the run."""
    accs = [accelerations] if isinstance(accelerations, (int, float)) else list(accelerations)
    fracs = center_fractions if center_fractions is None or isinstance(center_fractions, (int, float)) \
        else list(center_fractions)
    if len(accs) != 1:
        raise ValueError(f"a fixed mask has one acceleration, got {accs}")
    if isinstance(fracs, list):
        fracs = fracs[0]
    width = fixed_mask_width(protocol, crop, volumes, "the volumes",
                             "use per-sample masks (fixed_mask=False) or the paper protocol")
    mask = draw_fixed_mask(width, int(accs[0]), fracs, mask_type, protocol.mask_seed)
    path = Path(mask_file)
    if path.suffix != ".npy":
        path = path / f"mask_{mask_type}_{int(accs[0])}x_w{width}.npy"
    try:
        return load_or_save_mask(path, mask)
    except ValueError as err:
        raise DataError(str(err)) from err


def evaluation_dataset(
    root: str | os.PathLike,
    files: Collection[str] | None = None,
    *,
    crop: int | Sequence[int],
    acceleration: int,
    protocol: str | Protocol = "fastmri",
    mask_type: str = "random",
    center_fraction: float | None = None,
    fixed_mask: bool | None = None,
    num_slices: int | None = None,
    acquisitions: Collection[str] | None = DEFAULT_ACQUISITIONS,
) -> SplitDataset:
    """The slices to score: the volumes ``files`` under ``root``, or (None) every file of ``acquisitions`` there,
    undersampled and normalised under ``protocol`` (:mod:`kronify.mri.protocol`).

    Masks never depend on a random draw: with ``fixed_mask`` (default: the protocol's, on under ``paper``) every
    slice gets the one mask the protocol draws (fastMRI's mask function with the protocol's seed over the crop's
    columns under ``paper``, the raw k-space's under ``fastmri``), the mask a training run of the same settings
    saved; otherwise each volume gets its own mask seeded by its file name, as fastMRI's validation does.
    Raises :class:`~kronify.mri.errors.DataError` naming the folder or the volumes that are missing or too small.
    """
    protocol = get_protocol(protocol)
    crop_hw = (crop, crop) if isinstance(crop, int) else tuple(crop)
    volumes = scan_volumes(root, acquisitions).by_name()
    files = sorted(volumes) if files is None else sorted(files)
    missing = [f for f in files if f not in volumes]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} volume(s) to evaluate are not under {root} (or not of acquisition "
                        f"{sorted(acquisitions or [])}): {shown}")
    check_crop_fits(crop_hw, [volumes[name] for name in files])
    mask = None
    if protocol.fixed_mask if fixed_mask is None else fixed_mask:
        width = fixed_mask_width(protocol, crop_hw, [volumes[f] for f in files], f"the volumes under {root}",
                                 "evaluate without a fixed mask")
        mask = draw_fixed_mask(width, acceleration, center_fraction, mask_type, protocol.mask_seed)
    transform = MRITransform(crop_hw, acceleration, center_fraction, mask_type, fixed_mask=True, protocol=protocol,
                             mask=mask)
    return SplitDataset("test", data_folders(root), files, transform, num_slices)
