"""A table row trained with several seeds: where each seed's run lives, the row's numbers over seeds, and the
paired comparison of a Kronecker row with its dense row over the same test volumes.

A *run* is one finished recipe output folder (``metrics.json``, ``per_volume.csv``, ``per_slice.csv``); a *row*
is the same model trained with seeds ``s0, s0 + 1, ...``. With one seed a row is exactly its run (the folder
layout of a single-seed table is unchanged); with several, seed ``s`` trains into ``<row dir>/seed<s>/``.

:func:`row_over_seeds` reads the runs of a row: each metric's mean ± sample std over seeds
(:func:`kronify.mri.experiments.statistics.summarize_seeds`) and each seed's per-volume values. :func:`compare_rows` pairs
a Kronecker row with its dense row volume by volume (each volume averaged over seeds first,
:func:`kronify.mri.experiments.statistics.paired_comparison`); :func:`compare_seed_means` asks whether the difference
is larger than the seed-to-seed spread (Welch's t-test of the per-seed means). Per-volume values follow the
run's protocol: fastMRI's volume metrics (``per_volume.csv``) when the run scores volumes, the mean of the
volume's slice metrics (``per_slice.csv``) when it scores slices, as the paper's protocol does.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kronify.mri.experiments.statistics import (
    PairedComparison,
    SeedComparison,
    SeedSummary,
    compare_over_seeds,
    paired_comparison,
    summarize_seeds,
)

__all__ = ["COMPARED_METRICS", "RowOverSeeds", "compare_rows", "compare_seed_means", "comparison_dicts",
           "per_volume_values", "row_over_seeds", "seed_list", "seed_run_dir"]

#: Metrics whose Kronecker-minus-dense difference the tables report (higher is better for both).
COMPARED_METRICS = ("psnr", "ssim")
#: Metrics summarised over seeds (LPIPS only when every seed has it).
SUMMARISED_METRICS = ("ssim", "psnr", "nmse", "phase_error", "lpips")


def seed_list(first: int, count: int) -> list[int]:
    """The ``count`` consecutive seeds a row trains with, from ``first``; ``count`` must be >= 1."""
    if count < 1:
        raise ValueError(f"the number of seeds must be >= 1, got {count}")
    return [first + k for k in range(count)]


def seed_run_dir(row_dir: str | os.PathLike, seed: int, n_seeds: int) -> Path:
    """Where a row's run for ``seed`` lives: the row's own folder with one seed, ``<row_dir>/seed<seed>`` with
    several."""
    return Path(row_dir) if n_seeds == 1 else Path(row_dir) / f"seed{seed}"


def per_volume_values(run_dir: str | os.PathLike, metric: str) -> dict[str, float]:
    """``{volume: metric}`` of a finished run, at the run's own scope (see the module docstring)."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "metrics.json").read_text())
    by_slice = info.get("metrics_over") == "slices"
    path = run_dir / ("per_slice.csv" if by_slice else "per_volume.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or metric not in rows[0]:
        raise ValueError(f"{path} has no {metric!r} column (columns: {list(rows[0]) if rows else 'none'})")
    values: dict[str, list[float]] = {}
    for row in rows:
        values.setdefault(row["fname"], []).append(float(row[metric]))
    return {name: float(np.mean(v)) for name, v in values.items()}


@dataclass(frozen=True)
class RowOverSeeds:
    """One table row over its seeds: each seed's metrics.json, and each metric's summary over seeds."""

    seeds: tuple[int, ...]
    runs: tuple[dict[str, Any], ...]  # metrics.json of each seed, in seed order
    run_dirs: tuple[Path, ...]
    summaries: dict[str, SeedSummary]  # metric -> mean ± std over seeds of the runs' means

    @property
    def first(self) -> dict[str, Any]:
        """The first seed's metrics.json (params, FLOPs and the model name are the same for every seed)."""
        return self.runs[0]

    def per_volume(self, metric: str) -> list[dict[str, float]]:
        """Each seed's ``{volume: metric}``."""
        return [per_volume_values(d, metric) for d in self.run_dirs]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: seeds, each seed's means and the summaries over seeds."""
        return {"seeds": list(self.seeds),
                "per_seed": {m: [r.get(f"{m}_mean") for r in self.runs] for m in self.summaries},
                "over_seeds": {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in self.summaries.items()},
                "train_seconds": [r.get("train_seconds") for r in self.runs]}


def row_over_seeds(run_dirs: Sequence[str | os.PathLike], seeds: Sequence[int]) -> RowOverSeeds:
    """Read one row's finished runs (one per seed) and summarise each metric over the seeds."""
    if len(run_dirs) != len(seeds) or not run_dirs:
        raise ValueError(f"row_over_seeds needs one run folder per seed, got {len(run_dirs)} folders for "
                         f"seeds {list(seeds)}")
    dirs = tuple(Path(d) for d in run_dirs)
    runs = []
    for d in dirs:
        if not (d / "metrics.json").is_file():
            raise FileNotFoundError(f"{d} holds no finished run (no metrics.json)")
        runs.append(json.loads((d / "metrics.json").read_text()))
    models = {r.get("model") for r in runs}
    if len(models) != 1:
        raise ValueError(f"the runs of one row must train the same model, got {sorted(map(str, models))}")
    summaries = {}
    for metric in SUMMARISED_METRICS:
        values = [r.get(f"{metric}_mean") for r in runs]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            summaries[metric] = summarize_seeds(values)
    return RowOverSeeds(tuple(seeds), tuple(runs), dirs, summaries)


def compare_rows(kron: RowOverSeeds, dense: RowOverSeeds,
                 metrics: Sequence[str] = COMPARED_METRICS) -> dict[str, PairedComparison]:
    """Kronecker minus dense for each metric, paired over the test volumes (each averaged over its row's seeds)."""
    return {metric: paired_comparison(kron.per_volume(metric), dense.per_volume(metric)) for metric in metrics}


def compare_seed_means(kron: RowOverSeeds, dense: RowOverSeeds,
                       metrics: Sequence[str] = COMPARED_METRICS) -> dict[str, SeedComparison]:
    """Kronecker minus dense for each metric at the level of seeds: Welch's t-test of the rows' per-seed test
    means (:func:`kronify.mri.experiments.statistics.compare_over_seeds`; no test with one seed)."""
    return {metric: compare_over_seeds([r[f"{metric}_mean"] for r in kron.runs],
                                       [r[f"{metric}_mean"] for r in dense.runs]) for metric in metrics}


def comparison_dicts(comparisons: Mapping[str, PairedComparison | SeedComparison]) -> dict[str, dict[str, Any]]:
    """JSON-ready form of :func:`compare_rows`' or :func:`compare_seed_means`' result."""
    return {metric: c.as_dict() for metric, c in comparisons.items()}
