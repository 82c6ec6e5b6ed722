"""The volumes of a fastMRI single-coil data folder: scanning and checking them, and splitting them by volume.

Pipeline (issue 3, item 1):

1. :func:`scan_volumes` finds the h5 files under a root holding fastMRI's ``singlecoil_train/`` and
   ``singlecoil_val/`` folders (or any folder of such files), checks each one (readable, ``kspace``,
   ``reconstruction_esc`` target, ISMRMRD header, attrs) and keeps the wanted acquisitions
   (default ``CORPD_FBK``: proton density without fat suppression). Corrupt files stop the scan with
   their name (``on_corrupt="raise"``) or are skipped and reported (``on_corrupt="skip"``).
2. :func:`load_or_make_split` splits the pooled volumes (train + val folders; fastMRI's test folder has
   no targets) by volume: 420/64/200 volumes by default (:data:`FASTMRI_SPLIT`) or ratios such as
   :data:`DEMO_SPLIT` (0.6/0.1/0.3), with a fixed seed. The split is a JSON file, written once next to the
   results and reused afterwards, so a run can be repeated exactly.
3. :class:`SingleCoilSliceDataset` is fastMRI's ``SliceDataset`` restricted to the split's files and the
   central ``num_slices`` slices of each volume (default 20); :class:`SplitDataset` pools the folders.
4. :class:`kronify.mri.data.transforms.MRITransform` turns one slice into an :class:`MRISample` under one of the two
   protocols of :mod:`kronify.mri.protocol` (``paper`` or ``fastmri``). The metrics' data range (``max_value``)
   comes from the scored target: under ``fastmri`` :class:`SingleCoilSliceDataset` computes the max over a
   volume's scored slices from k-space and hands it to the transform.

fastMRI's dataset cache (``dataset_cache.pkl``, written into the working directory and keyed by root only,
which would mix up differently filtered datasets) is never used: scanning headers is cheap.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import xml.etree.ElementTree as etree
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from fastmri.data.mri_data import et_query

from kronify.mri.errors import DataError

__all__ = [
    "DATA_FOLDERS",
    "DEFAULT_ACQUISITIONS",
    "DEMO_MANIFEST",
    "DEMO_SPLIT",
    "FASTMRI_SPLIT",
    "SPLITS",
    "Volume",
    "VolumeIndex",
    "central_slices",
    "data_folders",
    "load_or_make_split",
    "make_split",
    "scan_volumes",
]

FASTMRI_SPLIT = (420, 64, 200)
DEMO_SPLIT = (0.6, 0.1, 0.3)
SPLITS = ("train", "val", "test")
DATA_FOLDERS = ("singlecoil_train", "singlecoil_val")
DEFAULT_ACQUISITIONS = ("CORPD_FBK",)
TARGET_KEY = "reconstruction_esc"
DEMO_MANIFEST = "kronify_demo.json"  # written by kronify.mri.data.demo; its presence selects DEMO_SPLIT by default
_SPLIT_VERSION = 1


@dataclass(frozen=True)
class Volume:
    """One checked h5 file."""

    path: Path
    acquisition: str
    num_slices: int
    shape: tuple[int, int]  # k-space (H, W) = image size before the crop

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class VolumeIndex:
    """The selected volumes of a root and the corrupt files that were skipped (path, reason)."""

    root: Path
    volumes: list[Volume]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def by_name(self) -> dict[str, Volume]:
        return {v.name: v for v in self.volumes}


def data_folders(root: str | os.PathLike) -> list[Path]:
    """fastMRI's ``singlecoil_train``/``singlecoil_val`` under ``root`` if present, else ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} does not exist or is not a folder")
    folders = [root / name for name in DATA_FOLDERS if (root / name).is_dir()]
    return folders or [root]


def _read_volume(path: Path) -> Volume:
    """Check one fastMRI single-coil file; OSError/KeyError/ValueError for a corrupt one, DataError without targets."""
    with h5py.File(path, "r") as hf:
        for key in ("kspace", "ismrmrd_header"):
            if key not in hf:
                raise KeyError(f"no '{key}' dataset")
        kspace = hf["kspace"]
        if kspace.ndim != 3 or not np.issubdtype(kspace.dtype, np.complexfloating):
            raise ValueError(f"'kspace' must be complex (slices, H, W), got {kspace.dtype} {kspace.shape}")
        if TARGET_KEY not in hf:
            raise DataError(
                f"{path}: no '{TARGET_KEY}' target (fastMRI's test files have none); only files with targets "
                "(singlecoil_train / singlecoil_val) can be used"
            )
        if hf[TARGET_KEY].shape[0] != kspace.shape[0]:
            raise ValueError(f"'{TARGET_KEY}' has {hf[TARGET_KEY].shape[0]} slices, 'kspace' {kspace.shape[0]}")
        if "max" not in hf.attrs:
            raise KeyError("no 'max' attribute")
        header = etree.fromstring(hf["ismrmrd_header"][()])
        for query in (
            ["encoding", "encodedSpace", "matrixSize", "y"],
            ["encoding", "reconSpace", "matrixSize", "x"],
            ["encoding", "encodingLimits", "kspace_encoding_step_1", "center"],
            ["encoding", "encodingLimits", "kspace_encoding_step_1", "maximum"],
        ):
            int(et_query(header, query))
        acquisition = hf.attrs.get("acquisition", "")
        if isinstance(acquisition, bytes):
            acquisition = acquisition.decode()
        return Volume(path, str(acquisition), int(kspace.shape[0]), (int(kspace.shape[1]), int(kspace.shape[2])))


def scan_volumes(
    root: str | os.PathLike,
    acquisitions: Collection[str] | None = DEFAULT_ACQUISITIONS,
    on_corrupt: str = "raise",
) -> VolumeIndex:
    """Check every ``*.h5`` file under ``root`` and keep those with a wanted acquisition (None keeps all).

    ``on_corrupt="raise"`` stops at the first unreadable file with its name; ``"skip"`` leaves such files
    out, lists them in :attr:`VolumeIndex.skipped` and warns with their names. A file without targets is
    always an error.
    """
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
    root = Path(root)
    volumes: list[Volume] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    found = 0
    for folder in data_folders(root):
        for path in sorted(folder.glob("*.h5")):
            found += 1
            if path.name in seen:
                raise DataError(f"file name {path.name!r} appears twice: {seen[path.name]} and {path}")
            seen[path.name] = path
            try:
                volume = _read_volume(path)
            except DataError:
                raise
            except (OSError, KeyError, ValueError, RuntimeError, etree.ParseError) as err:
                reason = f"{type(err).__name__}: {err}"
                if on_corrupt == "raise":
                    raise DataError(
                        f"corrupt or truncated h5 file {path} ({reason}); remove it or pass on_corrupt='skip'"
                    ) from err
                skipped.append((path, reason))
                continue
            if acquisitions is None or volume.acquisition in acquisitions:
                volumes.append(volume)
    if skipped:
        names = ", ".join(str(p) for p, _ in skipped)
        warnings.warn(f"skipped {len(skipped)} corrupt h5 file(s): {names}", stacklevel=2)
    if not volumes:
        if found == 0:
            raise DataError(f"no .h5 files under {root} (looked in {[str(f) for f in data_folders(root)]})")
        raise DataError(
            f"empty selection: none of the {found} h5 file(s) under {root} has acquisition in "
            f"{sorted(acquisitions or [])}" + (f" ({len(skipped)} skipped as corrupt)" if skipped else "")
        )
    return VolumeIndex(root, volumes, skipped)


def central_slices(num_slices_in_file: int, num_slices: int | None) -> range:
    """The ``num_slices`` central slice indices of a volume (all of them when it has fewer, or when None)."""
    if num_slices is None or num_slices >= num_slices_in_file:
        return range(num_slices_in_file)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1 or None, got {num_slices}")
    start = num_slices_in_file // 2 - num_slices // 2
    return range(start, start + num_slices)


def _split_sizes(split: Sequence[float], n: int) -> tuple[int, int, int]:
    """Volume counts (train, val, test) from counts or ratios."""
    if len(split) != 3:
        raise ValueError(f"split must have 3 entries (train, val, test), got {split!r}")
    if all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in split):
        counts = tuple(int(s) for s in split)
        if min(counts) < 0 or sum(counts) == 0:
            raise ValueError(f"split counts must be >= 0 and not all zero, got {split!r}")
        if sum(counts) > n:
            raise DataError(
                f"split {counts} asks for {sum(counts)} volumes but only {n} are selected; "
                f"pass ratios instead, e.g. {DEMO_SPLIT}"
            )
        return counts  # type: ignore[return-value]
    ratios = [float(s) for s in split]
    if min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(f"split ratios must be >= 0 and sum to 1, got {split!r}")
    n_val, n_test = (max(1, round(r * n)) if r > 0 else 0 for r in ratios[1:])
    n_train = n - n_val - n_test
    if n_train < (1 if ratios[0] > 0 else 0):
        raise DataError(f"{n} selected volume(s) are too few for split ratios {tuple(ratios)}")
    return n_train, n_val, n_test


def make_split(names: Collection[str], split: Sequence[float] = FASTMRI_SPLIT, seed: int = 0) -> dict[str, list[str]]:
    """Random split of volume names into train/val/test (sorted lists) plus ``unused`` ones; deterministic in seed."""
    pool = sorted(set(names))
    sizes = _split_sizes(split, len(pool))
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    out: dict[str, list[str]] = {}
    start = 0
    for name, size in zip(SPLITS, sizes):
        out[name] = sorted(order[start : start + size])
        start += size
    out["unused"] = sorted(order[start:])
    return out


def load_or_make_split(
    split_file: str | os.PathLike,
    index: VolumeIndex,
    split: Sequence[float] = FASTMRI_SPLIT,
    seed: int = 0,
    acquisitions: Collection[str] | None = DEFAULT_ACQUISITIONS,
) -> dict[str, list[str]]:
    """Reuse the split JSON when present (validated against the files and parameters), else make and write it."""
    split_file = Path(split_file)
    params = {
        "split": list(split),
        "seed": int(seed),
        "acquisitions": None if acquisitions is None else sorted(acquisitions),
    }
    available = set(index.by_name())
    if not split_file.exists():
        parts = make_split(available, split, seed)
        split_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = split_file.with_name(split_file.name + ".tmp")
        tmp.write_text(json.dumps({"version": _SPLIT_VERSION, **params, **parts}, indent=1) + "\n")
        tmp.replace(split_file)
        return parts
    try:
        saved = json.loads(split_file.read_text())
        parts = {name: list(saved[name]) for name in (*SPLITS, "unused")}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"split file {split_file} is not a kronify split ({err}); delete it to make a new one") from err
    recorded = {key: saved.get(key) for key in params}
    if recorded != params:
        raise DataError(
            f"split file {split_file} was made with {recorded}, but {params} was requested; "
            "pass the same parameters or delete the file to make a new split"
        )
    owner: dict[str, str] = {}
    for name, files in parts.items():
        for f in files:
            if f in owner:
                raise DataError(f"split file {split_file} puts volume {f} in both {owner[f]!r} and {name!r}")
            owner[f] = name
    skipped = {p.name for p, _ in index.skipped}
    missing = sorted(f for f, name in owner.items() if name != "unused" and f not in available and f not in skipped)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(
            f"split file {split_file} names {len(missing)} volume(s) missing under {index.root} "
            f"(or not of acquisition {params['acquisitions']}): {shown}"
        )
    dropped = sorted(f for f in owner if f in skipped)
    if dropped:
        warnings.warn(f"split file {split_file}: leaving out corrupt volume(s) {', '.join(dropped)}", stacklevel=2)
        parts = {name: [f for f in files if f not in skipped] for name, files in parts.items()}
    return parts
