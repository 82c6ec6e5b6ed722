"""Reconstructions in fastMRI's submission layout: one h5 file per volume, named like the input file, with a
``reconstruction`` dataset (slices × H × W, float32 magnitudes in the file's units).

The files are written by ``fastmri.utils.save_reconstructions``, the writer fastMRI's own scripts use, so
``fastmri.evaluate`` reads them as it reads a leaderboard submission. Slices arrive in dataset order (file by
file); :class:`ReconstructionWriter` writes each volume as soon as the next one starts, so no more than one
volume is held in memory. The slices a volume holds (all of them, or the central ones a preset keeps) are listed
in ``slices.json`` beside the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from fastmri.utils import save_reconstructions

__all__ = ["SLICE_INDEX", "ReconstructionWriter"]

#: The file beside the reconstructions that lists each volume's slice numbers.
SLICE_INDEX = "slices.json"


class ReconstructionWriter:
    """Collects (H, W) magnitude slices volume by volume and writes each volume once it is complete.

    Use as a context manager, or call :meth:`close` to write the last volume and ``slices.json``.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.written: dict[str, list[int]] = {}  # fname -> slice numbers, of the volumes written so far
        self._fname: str | None = None
        self._slices: dict[int, np.ndarray] = {}

    def add(self, fname: str, slice_num: int, image: np.ndarray) -> None:
        """One reconstructed magnitude slice (H, W) of volume ``fname``."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"expected an (H, W) magnitude slice of {fname}, got shape {image.shape}")
        if fname != self._fname:
            if fname in self.written:
                raise ValueError(f"slices of {fname} arrived after the volume was written; "
                                 "the dataset must yield each volume's slices together")
            self._flush()
            self._fname = fname
        if slice_num in self._slices:
            raise ValueError(f"slice {slice_num} of {fname} was given twice")
        self._slices[int(slice_num)] = image

    def _flush(self) -> None:
        if self._fname is None:
            return
        order = sorted(self._slices)
        save_reconstructions({self._fname: np.stack([self._slices[s] for s in order])}, self.out_dir)
        self.written[self._fname] = order
        self._fname, self._slices = None, {}

    def close(self) -> dict[str, list[int]]:
        """Write the last volume and ``slices.json``; returns {fname: slice numbers}."""
        self._flush()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / SLICE_INDEX).write_text(json.dumps(self.written, indent=1) + "\n")
        return dict(self.written)

    def __enter__(self) -> ReconstructionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
