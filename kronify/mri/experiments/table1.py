"""Table 1 of the paper, reproduced: its rows (:data:`kronify.mri.paper.TABLE1_ROWS`, narrowed by the preset and
``--models``), one acceleration at a time (:meth:`Table1.add_acceleration`: rows over seeds, paired Kronecker-minus-
dense comparisons, comparison figure and validation curves) and the writer of table1.md, table1.csv and
table1.json (:func:`write_table`: our numbers, the paper's published values in side columns, the caveats).
"""

from __future__ import annotations

import csv
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kronify.mri.errors import RecipeError
from kronify.mri.experiments.compress import CompressSettings
from kronify.mri.experiments.evaluate import example_indices, reconstruct_examples, zero_filled_metrics
from kronify.mri.experiments.figures import comparison_figure, curves_figure
from kronify.mri.experiments.jobs import machine_description, threads_per_job
from kronify.mri.experiments.presets import Preset
from kronify.mri.experiments.run import RunSpec
from kronify.mri.experiments.run_folder import write_json
from kronify.mri.experiments.setup import Data
from kronify.mri.experiments.statistics import PairedComparison, SeedComparison
from kronify.mri.experiments.study import (
    RowOverSeeds,
    compare_rows,
    compare_seed_means,
    comparison_dicts,
    read_row,
)
from kronify.mri.experiments.tables import (
    PAIRED_COLUMNS,
    PAIRED_HEADER,
    duration,
    markdown_table,
    mean_std,
    metric_columns,
    paired_cells,
    paired_csv_cells,
    paired_note,
    plus_minus,
    protocol_note,
    unet_rows_note,
)
from kronify.mri.metrics import METRICS, TABLE_METRICS, MetricsAccumulator
from kronify.mri.paper import COMPRESSED_ROWS, TABLE1, TABLE1_ROWS
from kronify.mri.protocol import get_protocol

__all__ = ["COLUMNS", "COMPRESSED", "COMPRESSED_SETTINGS", "Row", "Table1", "dense_row_of", "select_rows", "write_table"]

#: (label, family, kron_n, algebra); family None is zero-filling.
Row = tuple[str, "str | None", int, str]
#: Compressed row label -> the dense row it is compressed from (kronify.mri.paper.COMPRESSED_ROWS).
COMPRESSED: dict[str, str] = dict(COMPRESSED_ROWS)
#: How the compressed rows are made: ½ of the parameters, calibrated on 8 batches, distilled from the teacher and the
#: ground truth for 10 % of its steps: as close to dense U-Net and MoDL as 32 batches and 20 % were, over 3 seeds,
#: at under half the cost (docs/results/compress_trained.md, "MRI", "Cost").
COMPRESSED_SETTINGS = CompressSettings(budget=0.5, target="both", fraction=0.1, calibration_batches=8)


def _rows() -> list[Row]:
    """Table 1's rows, each compressed row after the last row of its family."""
    rows = list(TABLE1_ROWS)
    family = {label: fam for label, fam, *_ in rows}
    for label, dense in COMPRESSED_ROWS:
        last = max(i for i, row in enumerate(rows) if row[1] == family[dense])
        rows.insert(last + 1, (label, family[dense], 2, "learned"))
    return rows


ROWS: list[Row] = _rows()
#: The paper's metric columns: (metric, decimals).
PAPER_METRICS = (("ssim", 3), ("psnr", 2), ("lpips", 3))

SHORT = {"Efficient U-Net": "Eff. U-Net", "U-Net (fastMRI)": "U-Net (fM)", "Kronecker U-Net (fastMRI)": "Kron U-Net (fM)",
         "Kronecker U-Net (fastMRI, complex algebra)": "Kron U-Net (fM, cplx)",
         "Kron U-Net (compressed from the trained U-Net)": "Kron U-Net (compr.)",
         "Kron MoDL (compressed from the trained MoDL)": "Kron MoDL (compr.)"}

COLUMNS = ["Model", "Protocol", "Acc.", "Params (M)", "FLOPs (G)", *metric_columns(), "Train time", "Steps",
           "Paper Params (M)", "Paper FLOPs (G)", *(f"Paper {TABLE_METRICS[key][0]} (std)" for key, _ in PAPER_METRICS)]


def select_rows(models: str | None, preset: Preset) -> list[tuple[str, str | None, int, str]]:
    """Zero-filling plus the preset's default rows (``Preset.table_rows``; every row when it names none),
    narrowed to the comma-separated model families in ``models``; a family the defaults leave out (e.g. the
    demo's ``unet_ddpm``) brings every row of its own. A compressed row comes only with its dense row."""
    default = [row for row in ROWS[1:] if preset.table_rows is None or row[0] in preset.table_rows]
    if models is None:
        return _with_teachers([ROWS[0], *default])
    families = [f.strip() for f in models.split(",") if f.strip()]
    known = sorted({family for _, family, *_ in ROWS if family})
    unknown = [f for f in families if f not in known]
    if unknown or not families:
        raise RecipeError(f"--models takes model families separated by commas, from {known}; got {models!r}")
    in_default = {row[1] for row in default}
    return _with_teachers([row for row in ROWS if row[1] is None or
                           (row[1] in families and (row in default or row[1] not in in_default))])


def _with_teachers(rows: list[Row]) -> list[Row]:
    """``rows`` without the compressed rows whose dense row is not among them."""
    labels = {row[0] for row in rows}
    return [row for row in rows if row[0] not in COMPRESSED or COMPRESSED[row[0]] in labels]


def dense_row_of(label: str, rows: list[tuple[str, str | None, int, str]]) -> str | None:
    """The dense row a Kronecker row is compared with (same family, kron_n 0; a compressed row's teacher), if it is
    in ``rows``."""
    family, kron_n = next((f, n) for lab, f, n, _ in rows if lab == label)
    if not kron_n:
        return None
    dense = COMPRESSED.get(label) or next((lab for lab, f, n, _ in rows if f == family and n == 0), None)
    return dense if dense in {lab for lab, *_ in rows} else None


def _magnitude(x: np.ndarray) -> np.ndarray:
    return np.sqrt(x[0] ** 2 + x[1] ** 2)


@dataclass
class Table1:
    """The table being built, one acceleration at a time: markdown and CSV rows, JSON rows, LPIPS notes and the
    paired-comparison sections."""

    preset: Preset
    rows: list[Row]
    seeds: list[int]
    out: Path
    lines: list[list[str]] = field(default_factory=list)
    csv_rows: list[dict[str, Any]] = field(default_factory=list)
    json_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str | None] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def add_acceleration(self, acc: int, data: Data, specs: dict[str, RunSpec], zero_filled: MetricsAccumulator
                         ) -> None:
        """Add the rows at ``acc`` (every learned row trained: ``specs`` maps its label to its row's spec), the
        paired comparisons, comparison_<acc>x.png and curves_<acc>x.png."""
        preset, seeds, protocol = self.preset, self.seeds, get_protocol(self.preset.protocol)
        test = data.datasets["test"]
        results: dict[str, Any] = {"Zero-filled": {**zero_filled.summary(), "params": None, "gflops": None,
                                                   "train_seconds": None, "steps": None}}
        zf_examples = reconstruct_examples(None, test, example_indices(test, 2))
        panels = [{"target": _magnitude(e["target"]), "zero-filled": _magnitude(e["zero_filled"])} for e in zf_examples]
        over: dict[str, RowOverSeeds] = {}
        histories: dict[str, dict[str, tuple[list, list]]] = {}
        for label, family, _, _ in self.rows[1:]:
            over[label] = read_row(specs[label], seeds)
            results[label] = over[label].first
            first = over[label].records[0]
            for panel, output in zip(panels, first.examples()["output"]):
                panel[SHORT.get(label, label.replace("Kronecker", "Kron"))] = _magnitude(output)
            history = first.history()
            histories.setdefault(family, {})[label] = ([h["step"] for h in history], [h["val_psnr"] for h in history])
        labels = [label for label, *_ in self.rows]
        dense_of = {label: dense for label in labels if (dense := dense_row_of(label, self.rows))}
        paired = {label: compare_rows(over[label], over[dense]) for label, dense in dense_of.items()}
        seed_level = {label: compare_seed_means(over[label], over[dense]) for label, dense in dense_of.items()}
        for label in labels:
            row = table_row(label, protocol.name, acc, results[label], over.get(label))
            self.lines.append(row)
            self.csv_rows.append({**dict(zip(COLUMNS, row)), "Seeds": len(seeds) if label in over else "",
                                  "Std over": "seeds" if label in over and len(seeds) > 1 else
                                  results[label].get("metrics_over") or "volumes",
                                  **paired_csv_cells(paired.get(label), seed_level.get(label))})
            self.json_rows.append(json_row(label, protocol.name, acc, results[label], dict(zip(COLUMNS, row)),
                                           over.get(label), dense_of.get(label), paired.get(label),
                                           seed_level.get(label)))
        self.sections += paired_section(labels, dense_of, paired, len(seeds), acc, seed_level)
        comparison_figure(self.out / f"comparison_{acc}x.png", panels,
                          row_titles=[f"{e['fname']} #{e['slice_num']}" for e in zf_examples],
                          title=f"Test slices at {acc}x, {protocol.name} protocol: reconstructions (top) and "
                                "|error| (bottom)" + (f", seed {seeds[0]}" if len(seeds) > 1 else ""))
        val_zf = zero_filled_metrics(data.datasets["val"], preset.eval_batch_size).summary()["psnr_mean"]
        pairs = {fam: h for fam, h in histories.items() if len(h) > 1}  # families with a Kronecker row
        if pairs:
            curves_figure(self.out / f"curves_{acc}x.png",
                          {f"{fam}: validation PSNR (dB)": h for fam, h in pairs.items()},
                          title=f"Validation PSNR (EMA weights) vs step at {acc}x, {protocol.name} protocol, "
                                "dense vs Kronecker" + (f", seed {seeds[0]}" if len(seeds) > 1 else ""),
                          styles={lab: (":^" if lab in COMPRESSED else "--s" if "Kron" in lab else "-o")
                                  for h in pairs.values() for lab in h},
                          references={f"{fam}: validation PSNR (dB)": {"zero-filled": val_zf} for fam in pairs})
        self.notes.append(next((results[label].get("lpips_message") for label in labels[1:]), None))


def paired_section(labels: list[str], dense_of: dict[str, str], paired: dict[str, dict[str, PairedComparison]],
                   n_seeds: int, acc: int, seed_level: dict[str, dict[str, SeedComparison]] | None = None) -> list[str]:
    """The markdown section with every Kronecker row's paired comparison with its dense row."""
    if not paired:
        return []
    several = n_seeds > 1 and bool(seed_level)
    header = ["Kronecker row", "Dense row", *PAIRED_HEADER[: len(PAIRED_HEADER) - (0 if several else 1)]]
    cells = [[label, dense_of[label], *paired_cells(paired[label], seed_level[label] if several else None)]
             for label in labels if label in paired]
    notes = sorted({n for comparisons in paired.values() for n in comparisons["psnr"].notes})
    return [f"## Kronecker minus dense, paired over the test volumes ({acc}x, {n_seeds} seed"
            f"{'s' if n_seeds > 1 else ''})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in cells), "", paired_note(n_seeds, several),
            *(f"- {n}" for n in notes), ""]


def table_row(label: str, protocol: str, acc: int, m: dict[str, Any], over: RowOverSeeds | None = None) -> list[str]:
    """One table row from a metrics.json dict (zero-filled: no params, FLOPs or time); with ``over`` (several
    seeds) the metrics are mean ± std over the seeds and the train time is the mean per seed."""
    p = TABLE1.get(label)
    params = m.get("params")
    if over is not None and len(over.seeds) > 1:
        metrics = [plus_minus(over.summaries.get(key), digits) for key, (_, digits) in TABLE_METRICS.items()]
        seconds = float(np.mean([r["train_seconds"] for r in over.runs]))
    else:
        metrics = [mean_std(m.get(f"{key}_mean"), m.get(f"{key}_std"), digits)
                   for key, (_, digits) in TABLE_METRICS.items()]
        seconds = m.get("train_seconds")
    return [
        label, protocol, f"{acc}x",
        f"{params / 1e6:.4f}" if params is not None else "-",
        f"{m['gflops']:.4f}" if m.get("gflops") is not None else "-",
        *metrics, duration(seconds), str(m.get("steps") or "-"),
        f"{p.params_m:.3f}" if p and p.params_m else "-", f"{p.gflops:.3f}" if p and p.gflops else "-",
        *(mean_std(*getattr(p, key), digits) if p else "-" for key, digits in PAPER_METRICS),
    ]


def json_row(label: str, protocol: str, acc: int, m: dict[str, Any], display: dict[str, str],
             over: RowOverSeeds | None = None, dense: str | None = None,
             paired: dict[str, PairedComparison] | None = None,
             seed_level: dict[str, SeedComparison] | None = None) -> dict[str, Any]:
    """One table1.json row: the numbers as numbers (mean and std as floats, None when n/a) beside the display
    strings of the markdown/CSV table. With several seeds ``mean``/``std`` are over the seeds (``std_over``
    says which); ``seeds`` has each seed's means; a Kronecker row has its paired comparison with ``dense_row``
    over the test volumes (``paired``) and, with several seeds, Welch's test of the seeds' means (``seed_level``)."""
    p = TABLE1.get(label)
    several = over is not None and len(over.seeds) > 1
    if several:
        numbers = {metric: {"mean": over.summaries[metric].mean, "std": over.summaries[metric].std}
                   if metric in over.summaries else {"mean": None, "std": None} for metric in METRICS}
    else:
        numbers = {metric: {"mean": m.get(f"{metric}_mean"), "std": m.get(f"{metric}_std")} for metric in METRICS}
    return {
        "model": label, "protocol": protocol, "acceleration": acc, "zoo_model": m.get("model"),
        "metrics_over": m.get("metrics_over"), "n_slices": m.get("n_slices"), "n_volumes": m.get("n_volumes"),
        "params": m.get("params"), "gflops": m.get("gflops"),
        "std_over": "seeds" if several else m.get("metrics_over") or "volumes", **numbers,
        "train_seconds": m.get("train_seconds"), "steps": m.get("steps"),
        "seeds": None if over is None else over.as_dict(),
        "dense_row": dense, "paired": None if paired is None else comparison_dicts(paired),
        "seed_level": None if seed_level is None else comparison_dicts(seed_level),
        "paper": None if p is None else {
            "params_m": p.params_m, "gflops": p.gflops,
            **{k: {"mean": getattr(p, k)[0], "std": getattr(p, k)[1]} for k, _ in PAPER_METRICS}},
        "display": display,
    }


def write_table(out: Path, preset: Preset, lines: list[list[str]], csv_rows: list[dict], json_rows: list[dict],
                accelerations: list[int], notes: list, is_demo: bool, wall: float, argv: list[str] | None,
                reconciliation: list[str] = (), *, seeds: list[int] = (0,), sections: list[str] = (),
                jobs: int = 1, phases: dict[str, float] | None = None) -> None:
    """table1.md (with the command, machine, caveats and the paired comparisons in ``sections``), table1.csv,
    table1.json, and the table on stdout."""
    protocol = get_protocol(preset.protocol)
    command = "python recipes/table1.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
    seed_columns = metric_columns()
    header = COLUMNS if len(seeds) == 1 else [c.replace("(std)", "(± std over seeds)") if c in seed_columns else c
                                              for c in COLUMNS]
    table = markdown_table(header, lines)
    seeds_note = (f"- Seeds: every learned row trained with {len(seeds)} seeds ({', '.join(map(str, seeds))}: model "
                  "init, data order, training masks; the same split and test masks); SSIM/PSNR/LPIPS/phase error "
                  "are mean ± sample std over the seeds of each run's test mean; train time is the mean per seed; "
                  "zero-filling does not depend on the seed (its std is over the test "
                  f"{'slices' if protocol.metric_scope == 'slice' else 'volumes'}). The comparison figure and the "
                  f"curves show seed {seeds[0]}." if len(seeds) > 1 else
                  f"- Seeds: one ({seeds[0]}); `--seeds N` trains every row with N seeds and reports mean ± std "
                  "over them.")
    caveats = [
        protocol_note(protocol),
        f"- Preset `{preset.name}`: {preset.description}. Crop {preset.crop}x{preset.crop}, global batch "
        f"{preset.batch_size}, Adam lr {preset.lr:g}, EMA {preset.ema_decay} (warm-up), loss alpha {preset.alpha:g} / "
        f"beta {preset.beta:g} / gamma {preset.gamma:g}"
        + (" (perceptual term off: no VGG19 weights are shipped)." if preset.gamma == 0 else "."),
        *(["- Short-run aids (demo/tiny presets): random global phase per training sample (exact for MRI data) "
           "and every model wrapped so it starts from the zero-filled image (one extra scalar parameter, "
           "kronify.mri.training.wrappers.ZeroFilledStart). The paper preset uses neither."]
          if preset.phase_augment or preset.zero_filled_start else []),
        *([f"- Training-time augmentation of every training slice before masking (kronify.mri.data.augment): "
           f"{preset.augment.describe()}; validation and test slices are never augmented."]
          if preset.augment is not None and preset.augment.describe() != "off" else []),
        seeds_note,
        f"- Accelerations run: {', '.join(f'{a}x' for a in accelerations)}"
        + (" (the demo preset runs 4x only to fit its time budget)." if preset.name == "demo" else "."),
        f"- FLOPs: one 2x{preset.crop}x{preset.crop} slice (torch.utils.flop_counter, 2*MAC, Kronecker models "
        "after kronify.merge); the paper's column is at 320x320 with its own models, so only the paper preset is "
        "comparable.",
        f"- SSIM/PSNR/phase error: mean (std) over test {'slices' if protocol.metric_scope == 'slice' else 'volumes'}"
        ", fastMRI's metric functions on magnitudes, data range from the scored target (see the protocol line); "
        "phase error = mean |wrapped phase difference| where |target| > 10% of the slice max.",
        unet_rows_note({row[0] for row in lines}),
        *([f"- Compressed rows (not in the paper): seed s of the trained dense row compressed by `recipes/compress.py "
           f"--budget {COMPRESSED_SETTINGS.budget} --calibration-batches {COMPRESSED_SETTINGS.calibration_batches}` "
           f"(½ of the parameters, more Kronecker terms where the calibrated error needs them, calibrated warm start "
           f"from its EMA weights, then distillation from it and the ground truth (`--target "
           f"{COMPRESSED_SETTINGS.target}`) for {COMPRESSED_SETTINGS.fraction:.0%} of its steps); their steps and "
           "train time are the distillation's, and their paired comparison is with that dense row."]
          if any(row[0] in COMPRESSED for row in lines) else []),
        "- Train time: wall time of training incl. validation. Every model is evaluated with its EMA weights."
        + (f" {jobs} runs trained at a time (`--jobs`), each in its own process with "
           f"{threads_per_job(jobs)} torch thread(s)." if jobs > 1 else ""),
        "- Paper columns: the paper's Table 1 as published (it does not state the acceleration; the official "
        "configurations run 8x; it has no dense U-Net, SwinMR, MoDL, Kronecker MoDL, fastMRI U-Net or "
        "complex-algebra rows).",
    ]
    caveats += [f"- {note}" for note in preset.notes]  # the preset's choices and what they were measured to give
    if preset.name == "demo" and protocol.name == "fastmri":
        caveats.append("- The demo preset uses the fastmri protocol by default: the demo files are fastMRI-format "
                       "raw k-space, and per-sample random masks with per-volume metrics are what that format's own "
                       "transforms do; `--protocol paper` runs the official code's protocol on them at their size.")
    if is_demo:
        caveats.insert(0, "- DATA: the kronify demo dataset (MNI152 brain, synthetic phase and noise), NOT fastMRI "
                          "knee: these numbers check the pipeline and compare models with each other, they are not "
                          "a reproduction of the paper's values.")
    lp = next((n for n in notes if n), None)
    if lp:
        caveats.append(f"- LPIPS n/a: {lp}")
    md = [f"# Table 1 ({preset.name} preset, {protocol.name} protocol)", "", f"Command: `{command}`", "",
          f"Machine: {machine_description()}", "", f"Wall time: {wall / 60:.1f} min (including data preparation)"
          + ("; " + ", ".join(f"{name} {duration(sec)}" for name, sec in phases.items()) if phases else ""), "",
          *table, "", *caveats, "", *sections,
          *(f"![comparison {a}x](comparison_{a}x.png)\n\n![curves {a}x](curves_{a}x.png)\n" for a in accelerations),
          *reconciliation]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text("\n".join(md) + "\n")
    with open(out / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "Seeds", "Std over", *PAIRED_COLUMNS])
        writer.writeheader()
        writer.writerows(csv_rows)
    write_json(out / "table1.json", {"command": command, "machine": machine_description(), "wall_seconds": wall,
                                     "preset": preset.name, "protocol": protocol.name, "seeds": list(seeds),
                                     "accelerations": accelerations, "phase_seconds": phases or {},
                                     "rows": json_rows})
    print("\n".join(table))
    print(f"\n{protocol.name} protocol; wrote {out / 'table1.md'}, table1.csv and table1.json ({wall / 60:.1f} min)")


