"""The data-efficiency study (recipes/data_efficiency.py): dense vs Kronecker models trained on fractions of the
training data, with several seeds. :func:`subset` draws a seed's training subset, :class:`Study` reads the runs
back into table rows, curves and paired comparisons, :func:`write_outputs` writes data_efficiency.md/.csv/.json
and the figures.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kronify.mri.data.datasets import SliceSubset
from kronify.mri.experiments.figures import curves_figure, errorbar_figure
from kronify.mri.experiments.presets import Preset
from kronify.mri.experiments.run import RunSpec
from kronify.mri.experiments.run_folder import write_json
from kronify.mri.experiments.setup import Data
from kronify.mri.experiments.study import RowOverSeeds, compare_rows, compare_seed_means, comparison_dicts, read_row
from kronify.mri.experiments.tables import PAIRED_HEADER, markdown_table, paired_cells, paired_note
from kronify.mri.protocol import get_protocol

__all__ = ["COLUMNS", "PAIRED", "Study", "subset", "write_outputs"]

COLUMNS = ["Family", "Fraction", "Train volumes", "Train slices", "Model", "Params (M)", "Seeds", "SSIM (std)",
           "PSNR (std)", "NMSE", "Phase error rad", "Final val loss", "Final val PSNR", "Train time"]
PAIRED = ["Family", "Fraction", "Train volumes", "Kronecker model", "Dense model", *PAIRED_HEADER]


def subset(data: Data, fraction: float, seed: int, unit: str = "volume") -> Data:
    """``data`` with a seeded subset of its training data: ``ceil(fraction × volumes)`` (>= 1) volumes when
    ``unit`` is "volume", ``ceil(fraction × slices)`` (>= 1) slices when it is "slice"."""
    train = data.datasets["train"]
    rng = np.random.default_rng(seed)
    if unit == "slice":
        count = max(1, math.ceil(fraction * len(train)))
        part = SliceSubset(train, rng.permutation(len(train))[:count])
    else:
        files = sorted(train.files)
        count = max(1, math.ceil(fraction * len(files)))
        part = train.with_transform(train.transform, sorted(files[i] for i in rng.permutation(len(files))[:count]))
    return Data(data.root, {**data.datasets, "train": part}, data.is_demo)


def _cell(row: RowOverSeeds, metric: str, digits: int) -> str:
    """mean ± std over seeds, or (one seed) mean (std over the test set)."""
    if len(row.seeds) > 1:
        return row.summaries[metric].format(digits).replace(" (1 seed)", "")
    m = row.first
    std = m.get(f"{metric}_std")
    return f"{m[f'{metric}_mean']:.{digits}f}" + ("" if std is None else f" ({std:.{digits}f})")


@dataclass
class Study:
    """The study's tables and figures' data, one (family, fraction) at a time (:meth:`add_fraction`)."""

    rows: list[list[str]] = field(default_factory=list)
    paired_rows: list[list[str]] = field(default_factory=list)
    numbers: list[dict[str, Any]] = field(default_factory=list)
    points: dict[str, dict[str, list]] = field(default_factory=dict)
    loss_curves: dict[str, tuple[list, list]] = field(default_factory=dict)
    psnr_curves: dict[str, tuple[list, list]] = field(default_factory=dict)

    def add_fraction(self, family: str, zoo_name: str, fraction: float, train_set: Any, specs: dict[int, RunSpec],
                     seeds: list[int]) -> None:
        """The dense and Kronecker rows (``specs``: Kronecker n -> the row's spec) of ``family`` at ``fraction``
        (trained on ``train_set``, the first seed's subset), and their paired comparison."""
        volumes, slices = len(train_set.files), len(train_set)
        by_n: dict[int, RowOverSeeds] = {}
        for n, spec in specs.items():
            row = by_n[n] = read_row(spec, seeds)
            histories = [r.history() for r in row.records]
            label = f"{zoo_name} {'Kronecker' if n else 'dense'} {fraction:.0%} ({volumes} vol)"
            steps = [h["step"] for h in histories[0]]
            self.loss_curves[label] = (steps, [h["val_loss"] for h in histories[0]])
            self.psnr_curves[label] = (steps, [h["val_psnr"] for h in histories[0]])
            last = [h[-1] for h in histories if h]
            final = {key: float(np.mean([h[key] for h in last])) if last else float("nan")
                     for key in ("val_loss", "val_psnr")}  # the last validation, mean over seeds
            seconds = float(np.mean([r["train_seconds"] for r in row.runs]))
            self.rows.append([family, f"{fraction:.0%}", str(volumes), str(slices), spec.name,
                              f"{row.first['params'] / 1e6:.4f}", str(len(seeds)), _cell(row, "ssim", 3),
                              _cell(row, "psnr", 2), f"{row.summaries['nmse'].mean:.4f}",
                              f"{row.summaries['phase_error'].mean:.3f}", f"{final['val_loss']:.4f}",
                              f"{final['val_psnr']:.2f}", f"{seconds:.0f} s"])
            psnr = row.summaries["psnr"]
            self.points.setdefault(family, {}).setdefault("Kronecker" if n else "dense", []).append(
                (fraction, psnr.mean, psnr.std))
            self.numbers.append({"family": family, "fraction": fraction, "train_volumes": volumes,
                                 "train_slices": slices, "model": spec.name, "kron_n": n,
                                 "params": row.first["params"], **row.as_dict()})
        (dense_n, dense), (kron_n, kron) = sorted(by_n.items())
        comparison, seed_level = compare_rows(kron, dense), compare_seed_means(kron, dense)
        self.paired_rows.append([family, f"{fraction:.0%}", str(volumes), specs[kron_n].name, specs[dense_n].name,
                                 *paired_cells(comparison, seed_level)])
        self.numbers.append({"family": family, "fraction": fraction, "paired": comparison_dicts(comparison),
                             "seed_level": comparison_dicts(seed_level)})


def write_outputs(out: Path, study: Study, preset: Preset, families: list[str], kron_n: int, acceleration: int,
                  max_steps: int | None, seeds: list[int], fractions: list[float], is_demo: bool, zfs: dict,
                  start: float) -> None:
    """data_efficiency.md/.csv/.json, psnr_vs_fraction.png (test PSNR ± std over seeds) and curves.png."""
    protocol = get_protocol(preset.protocol)
    rows, paired_rows, numbers, points = study.rows, study.paired_rows, study.numbers, study.points
    loss_curves, psnr_curves = study.loss_curves, study.psnr_curves
    names = ", ".join(preset.model(f).zoo_name for f in families)
    several = len(seeds) > 1
    styles = {label: ("--s" if "Kronecker" in label else "-o") for label in loss_curves}
    curves_figure(out / "curves.png", {"validation loss": loss_curves, "validation PSNR (dB)": psnr_curves},
                  title=f"{names}: dense vs Kronecker (n={kron_n}) by training-set size, {acceleration}x, "
                        f"{protocol.name} protocol" + (f", seed {seeds[0]}" if several else ""), styles=styles)
    panels = {preset.model(f).zoo_name: {kind: tuple(map(list, zip(*pts))) for kind, pts in points[f].items()}
              for f in families if f in points}
    errorbar_figure(out / "psnr_vs_fraction.png", panels, xlabel="fraction of the training volumes",
                    ylabel="test PSNR (dB)", xticks=fractions, xscale="log",
                    styles={"dense": "-o", "Kronecker": "--s"},
                    references={p: {"zero-filled": zfs["psnr_mean"]} for p in panels},
                    title=f"Test PSNR vs training-set size ({preset.name} preset, {protocol.name} protocol, "
                          f"{acceleration}x): " + (f"mean ± std over {len(seeds)} seeds" if several
                                                       else f"one seed ({seeds[0]})"))
    steps = ", ".join(f"{preset.model(f).zoo_name} {max_steps or preset.steps_for(f)}" for f in families)
    table = markdown_table(COLUMNS, rows)
    md = [f"# Data efficiency: {names} dense vs Kronecker ({preset.name} preset, {protocol.name} protocol, "
          f"{acceleration}x)", "", *table, "",
          f"Zero-filled test SSIM {zfs['ssim_mean']:.3f}, PSNR {zfs['psnr_mean']:.2f} dB. Steps per run: {steps}; "
          f"batch {preset.batch_size}; same validation and test volumes; training subsets drawn by "
          f"{protocol.train_subset}" + (" with each seed's own draw (the dense and Kronecker runs of a seed share "
                                        "it)" if several else "") + f"; {protocol.title}. Seeds: "
          f"{', '.join(map(str, seeds))}; "
          + ("SSIM/PSNR are mean ± std over the seeds of each run's test mean, NMSE/phase error/final validation "
             "values their means over seeds." if several else "SSIM/PSNR are mean (std) over the test set.")
          + (" Demo data (brain, not knee)." if is_demo else ""), ""]
    if paired_rows:
        md += ["## Kronecker minus dense, paired over the test volumes", "", *markdown_table(PAIRED, paired_rows), "",
               paired_note(len(seeds), True), ""]
    md += ["![test PSNR vs fraction](psnr_vs_fraction.png)", "", "![validation curves](curves.png)", ""]
    (out / "data_efficiency.md").write_text("\n".join(md) + "\n")
    with open(out / "data_efficiency.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    write_json(out / "data_efficiency.json", {"preset": preset.name, "protocol": protocol.name,
                                              "acceleration": acceleration, "seeds": seeds,
                                              "fractions": fractions, "zero_filled": zfs, "rows": numbers})
    print("\n".join(table))
    if paired_rows:
        print("\n" + "\n".join(markdown_table(PAIRED, paired_rows)))
    print(f"\nwrote {out / 'data_efficiency.md'} ({(time.perf_counter() - start) / 60:.1f} min)")
