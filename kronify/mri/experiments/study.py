"""Studies: model variants (:class:`~kronify.mri.experiments.run.RunSpec`) trained with several seeds, read back
as table rows and compared; what recipes/table1.py and recipes/data_efficiency.py share.

A *run* is one finished run folder (:class:`~kronify.mri.experiments.run_folder.RunRecord`); a *row* is the same
model trained with seeds ``s0, s0 + 1, ...``. With one seed a row is exactly its run (the folder layout of a
single-seed table is unchanged); with several, seed ``s`` trains into ``<row dir>/seed<s>/``
(:func:`seed_runs`). :func:`train_pending` trains the runs not finished yet, several at a time
(:func:`pending_training` gives them as tasks).

:func:`row_over_seeds` reads the runs of a row: each metric's mean ± sample std over seeds
(:func:`kronify.mri.experiments.statistics.summarize_seeds`) and each seed's per-volume values. :func:`compare_rows`
pairs a Kronecker row with its dense row volume by volume (each volume averaged over seeds first,
:func:`kronify.mri.experiments.statistics.paired_comparison`); :func:`compare_seed_means` asks whether the
difference is larger than the seed-to-seed spread (Welch's t-test of the per-seed means). Per-volume values
follow the run's protocol (:meth:`~kronify.mri.experiments.run_folder.RunRecord.per_volume`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kronify.mri.experiments.presets import Preset
from kronify.mri.experiments.jobs import Task, run_tasks
from kronify.mri.experiments.run import ModelFactory, RunSpec, train_tasks
from kronify.mri.experiments.run_folder import RunRecord
from kronify.mri.experiments.setup import Data
from kronify.mri.metrics import MetricsAccumulator
from kronify.mri.experiments.statistics import (
    PairedComparison,
    SeedComparison,
    SeedSummary,
    compare_over_seeds,
    paired_comparison,
    summarize_seeds,
)

__all__ = ["COMPARED_METRICS", "RowOverSeeds", "compare_rows", "compare_seed_means", "comparison_dicts",
           "pending_training", "per_volume_values", "read_row", "reuses_finished_run", "row_over_seeds", "seed_list",
           "seed_run_dir", "seed_runs", "train_pending"]

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
    """``{volume: metric}`` of a finished run, at the run's own scope (:meth:`RunRecord.per_volume`)."""
    return RunRecord.read(run_dir).per_volume(metric)


def seed_runs(spec: RunSpec, seeds: Sequence[int]) -> list[RunSpec]:
    """``spec`` (its ``out_dir`` the row's folder) once per seed, each in its seed's folder (:func:`seed_run_dir`)."""
    return [spec.at(seed_run_dir(spec.out_dir, seed, len(seeds)), seed) for seed in seeds]


def pending_training(runs: Sequence[tuple[RunSpec, Data]], preset: Preset, build: ModelFactory, jobs: int = 1, *,
                     zero_filled: MetricsAccumulator | None = None) -> dict[Path, Task]:
    """A training task (:func:`~kronify.mri.experiments.run.train_tasks`) for each run not finished yet, keyed by
    its folder, in the order of ``runs``; a run with ``resume`` whose folder holds a finished run is reused."""
    pending = [(spec, data) for spec, data in runs if not reuses_finished_run(spec)]
    tasks = train_tasks(pending, preset, build, jobs, zero_filled=zero_filled)
    return {spec.out_dir: task for (spec, _), task in zip(pending, tasks)}


def train_pending(runs: Sequence[tuple[RunSpec, Data]], preset: Preset, build: ModelFactory, jobs: int = 1, *,
                  zero_filled: MetricsAccumulator | None = None) -> bool:
    """Train the runs of :func:`pending_training`, ``jobs`` at a time. False on a non-zero DDP rank (rank 0
    writes tables)."""
    return all(run_tasks(list(pending_training(runs, preset, build, jobs, zero_filled=zero_filled).values()), jobs))


def reuses_finished_run(spec: RunSpec) -> bool:
    """True (and says so) when ``spec`` resumes into a folder that already holds a finished run."""
    if spec.resume and RunRecord.is_finished(spec.out_dir):
        print(f"{spec.name} {spec.acceleration}x seed {spec.seed}: reusing its finished run", flush=True)
        return True
    return False


@dataclass(frozen=True)
class RowOverSeeds:
    """One table row over its seeds: each seed's run, and each metric's summary over seeds."""

    seeds: tuple[int, ...]
    records: tuple[RunRecord, ...]  # in seed order
    summaries: dict[str, SeedSummary]  # metric -> mean ± std over seeds of the runs' means

    @property
    def runs(self) -> tuple[Mapping[str, Any], ...]:
        """Each seed's metrics.json, in seed order."""
        return tuple(r.info for r in self.records)

    @property
    def run_dirs(self) -> tuple[Path, ...]:
        return tuple(r.path for r in self.records)

    @property
    def first(self) -> Mapping[str, Any]:
        """The first seed's metrics.json (params, FLOPs and the model name are the same for every seed)."""
        return self.records[0].info

    def per_volume(self, metric: str) -> list[dict[str, float]]:
        """Each seed's ``{volume: metric}``."""
        return [r.per_volume(metric) for r in self.records]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: seeds, each seed's means and the summaries over seeds."""
        return {"seeds": list(self.seeds),
                "per_seed": {m: [r.mean(m) for r in self.records] for m in self.summaries},
                "over_seeds": {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in self.summaries.items()},
                "train_seconds": [r.info.get("train_seconds") for r in self.records]}


def row_over_seeds(run_dirs: Sequence[str | os.PathLike], seeds: Sequence[int]) -> RowOverSeeds:
    """Read one row's finished runs (one per seed) and summarise each metric over the seeds."""
    if len(run_dirs) != len(seeds) or not run_dirs:
        raise ValueError(f"row_over_seeds needs one run folder per seed, got {len(run_dirs)} folders for "
                         f"seeds {list(seeds)}")
    records = tuple(RunRecord.read(d) for d in run_dirs)
    models = {r.model for r in records}
    if len(models) != 1:
        raise ValueError(f"the runs of one row must train the same model, got {sorted(map(str, models))}")
    summaries = {}
    for metric in SUMMARISED_METRICS:
        values = [r.mean(metric) for r in records]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            summaries[metric] = summarize_seeds(values)
    return RowOverSeeds(tuple(seeds), records, summaries)


def read_row(spec: RunSpec, seeds: Sequence[int]) -> RowOverSeeds:
    """The row of ``spec`` (its ``out_dir`` the row's folder) over ``seeds``."""
    return row_over_seeds([s.out_dir for s in seed_runs(spec, seeds)], seeds)


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
