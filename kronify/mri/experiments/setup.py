"""What a run is trained on, checked before any training: the data (demo build or fastMRI folder, split, masks)
and the model variant's flags.

- :class:`MaskSettings`: protocol, mask type, centre fraction, fixed or not (recorded in every metrics.json).
- :func:`prepare_data`: build (or reuse) the demo data or check ``data_path``, then the split's datasets
  (:func:`kronify.mri.data.datasets.build_datasets`) and that every split has slices.
- :func:`check_variant`: a model family the preset has, Kronecker n 0 or >= 2, the complex algebra only at n = 2.

Every problem is a :class:`~kronify.mri.errors.RecipeError` naming the flag or the folder.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kronify.mri.data.datasets import SplitDataset, build_datasets
from kronify.mri.data.volumes import SPLITS
from kronify.mri.errors import DataError, RecipeError
from kronify.mri.experiments.presets import FAMILIES, Preset
from kronify.mri.protocol import get_protocol

__all__ = ["Data", "MaskSettings", "cache_dir", "check_variant", "is_global_zero", "prepare_data"]


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where the demo dataset is built: ``--cache-dir``, else $KRONIFY_CACHE, else ~/.cache/kronify."""
    return Path(explicit or os.environ.get("KRONIFY_CACHE") or Path.home() / ".cache" / "kronify").expanduser()


def is_global_zero() -> bool:
    """Whether this process is rank 0 of a (possibly distributed) run, from the launcher's environment."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


@dataclass(frozen=True)
class MaskSettings:
    """How slices are undersampled: the protocol, the mask function, its centre fraction (None: the acceleration's
    default) and whether one fixed mask serves training and testing."""

    protocol: str
    mask_type: str = "random"
    center_fraction: float | None = None
    fixed_mask: bool = False

    @classmethod
    def of(cls, preset: Preset, mask_type: str = "random", center_fraction: float | None = None,
           fixed_mask: bool | None = None) -> MaskSettings:
        """The preset's protocol with these mask flags (``fixed_mask`` None: the protocol's default)."""
        protocol = get_protocol(preset.protocol)
        return cls(protocol.name, mask_type, center_fraction,
                   protocol.fixed_mask if fixed_mask is None else bool(fixed_mask))

    def as_dict(self) -> dict[str, Any]:
        """As recorded in metrics.json."""
        return asdict(self)


@dataclass
class Data:
    """The datasets of one run (train/val/test) and where they came from."""

    root: Path
    datasets: dict[str, SplitDataset]
    is_demo: bool


def prepare_data(preset: Preset, split_file: Path, acceleration: int, masks: MaskSettings, *,
                 data_path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                 limit_cases: int | None = None) -> Data:
    """Build (or reuse) the data and the split; check that the preset fits it."""
    if data_path is not None:
        root = Path(data_path).expanduser()
        if not root.is_dir():
            raise RecipeError(f"--data-path {str(root)!r} does not exist or is not a folder")
        is_demo = False
    else:
        if preset.demo_build is None:
            raise RecipeError(f"preset {preset.name!r} is for real fastMRI data: pass --data-path ROOT "
                              "(or use --preset demo)")
        from kronify.mri.data.demo import NOTICE, build_demo_dataset

        build = preset.demo_build
        tag = "-".join(f"{k}{'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
                       for k, v in sorted(build.items()))
        root = cache_dir(cache) / f"demo-{tag}"
        result = build_demo_dataset(root, **build)
        if not result.reused and is_global_zero():
            print(f"built the demo dataset in {root} ({result.seconds:.0f} s). {NOTICE}", flush=True)
        is_demo = True
    try:
        datasets = build_datasets(root, split_file, crop=preset.crop, accelerations=acceleration,
                                  num_slices=preset.num_slices, protocol=masks.protocol,
                                  mask_type=masks.mask_type, center_fractions=masks.center_fraction,
                                  fixed_mask=masks.fixed_mask, mask_file=split_file.parent)
    except DataError as err:
        if "larger than the image" in str(err):
            raise RecipeError(f"preset {preset.name!r} crops {preset.crop}x{preset.crop} but the data does not fit: "
                              f"{err}. Use a preset with a smaller crop (e.g. --preset demo).") from err
        raise RecipeError(str(err)) from err
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(str(err)) from err
    if limit_cases is not None:
        datasets = {name: ds.with_transform(ds.transform, ds.files[:limit_cases]) for name, ds in datasets.items()}
    for name in SPLITS:
        if len(datasets[name]) == 0:
            raise RecipeError(f"the {name} split under {root} has no slices (split file {split_file}); "
                              "the data has too few volumes for this split")
    return Data(root, datasets, is_demo)


def check_variant(family: str, preset: Preset, kron_n: int, algebra: str) -> None:
    """Validate a variant's flags before any data is built."""
    if family not in FAMILIES or family not in preset.models:
        raise RecipeError(f"preset {preset.name!r} has no model family {family!r}; it has {sorted(preset.models)}")
    if kron_n < 0 or kron_n == 1:
        raise RecipeError(f"--kron-n must be 0 (dense) or >= 2, got {kron_n}")
    if algebra == "complex" and kron_n not in (0, 2):
        raise RecipeError(f"--algebra complex is the n = 2 algebra; got --kron-n {kron_n}")
