"""Reproduce the paper's Table 1: zero-filling, LB U-Net, Efficient U-Net, the paper's U-Net and Kronecker U-Net
(DDPM-style, zoo `unet_ddpm`), fastMRI's U-Net and its Kronecker versions (learned and fixed complex algebra),
SwinMR, Kronecker SwinMR, MoDL and Kronecker MoDL, trained and tested on the same split under one protocol.

    python recipes/table1.py --preset demo                  # `make demo`: demo data, 2 CPU cores, 4x, fastmri protocol
    python recipes/table1.py --data-path /data/fastmri      # the paper preset and protocol at 8x and 4x (GPU)
    python recipes/table1.py --tiny --protocol paper --out /tmp/t1   # every row in seconds (tests)
    python recipes/table1.py --preset demo --models unet,swinmr,modl --seeds 3   # the seeds study

A preset may run fewer rows by default (``Preset.table_rows``: the demo leaves out the DDPM U-Net and the
complex-algebra row, which do not fit its time budget; ``--models unet_ddpm`` runs them). Rows are independent
runs: ``--jobs N`` (the demo's default: 2) trains N at a time, each in its own process (kronify.mri.experiments.jobs).

``--protocol paper|fastmri`` (default: the preset's) is named in every table, row, figure title and JSON file.

Writes OUT/table1.md, OUT/table1.csv and OUT/table1.json (our numbers, as floats in the JSON, the paper's
published values in side columns),
OUT/comparison_<acc>x.png (reconstructions and error maps of every model on the same test slices),
OUT/curves_<acc>x.png (validation PSNR vs step, dense vs Kronecker) and every run under OUT/runs/<acc>x/<model>/.
With --resume finished rows are reused and unfinished ones continue from their last checkpoint.

``--seeds N`` trains every row with seeds --seed .. --seed + N - 1 (kronify.mri.experiments.study; with N > 1 seed s trains
into runs/<acc>x/<model>/seed<s>/): rows then report mean ± std over the seeds. Every Kronecker row is compared
with its dense row over the test volumes (Kronecker minus dense, each volume averaged over seeds): mean
difference, 95 % t and bootstrap CIs and a Wilcoxon p-value (kronify.mri.experiments.statistics), in a section of table1.md,
extra columns of table1.csv and each row's ``paired`` entry in table1.json. ``--models unet_ddpm,swinmr,modl``
runs only those families' rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    RecipeError,
    add_arguments,
    default_out,
    prepare_data,
    resolve_preset,
    resolve_jobs,
    train_calls,
    variant_name,
)
from kronify.mri.experiments.evaluate import (
    example_indices,
    machine_description,
    reconstruct_examples,
    write_json,
    zero_filled_metrics,
)
from kronify.mri.experiments.figures import comparison_figure, curves_figure
from kronify.mri.experiments.jobs import threads_per_job
from kronify.mri.metrics import METRICS, MetricsAccumulator
from kronify.mri.experiments.presets import TABLE1_ROWS, Preset
from kronify.mri.protocol import get_protocol
from kronify.mri.experiments.study import (
    RowOverSeeds,
    compare_rows,
    compare_seed_means,
    comparison_dicts,
    row_over_seeds,
    seed_list,
    seed_run_dir,
)
from kronify.mri.experiments.statistics import PairedComparison, SeedComparison, SeedSummary

# (label, family, kron_n, algebra); family None is zero-filling.
ROWS: list[tuple[str, str | None, int, str]] = list(TABLE1_ROWS)

# The paper's Table 1 (/work/shared/seeds/000_82e303a2590c0f8d.txt): params (M), FLOPs (G), SSIM, PSNR, LPIPS
# as mean (std). Its text does not state which acceleration the table is for (the official configurations run
# 8x); it has no dense U-Net, SwinMR, MoDL, Kronecker MoDL, fastMRI U-Net or complex-algebra rows. (Its LB U-Net
# SSIM repeats the zero-filled value, as printed.)
PAPER: dict[str, dict[str, Any]] = {
    "Zero-filled": dict(params=None, gflops=None, ssim=(0.430, 0.130), psnr=(22.75, 1.73), lpips=(0.504, 0.058)),
    "LB U-Net": dict(params=1.025, gflops=2.512, ssim=(0.430, 0.130), psnr=(23.92, 2.54), lpips=(0.449, 0.067)),
    "Efficient U-Net": dict(params=3.896, gflops=1.039, ssim=(0.730, 0.083), psnr=(28.97, 2.41),
                            lpips=(0.396, 0.066)),
    "Kronecker SwinMR": dict(params=1.204, gflops=41.649, ssim=(0.763, 0.073), psnr=(29.35, 2.35),
                             lpips=(0.266, 0.048)),
    "Kronecker U-Net": dict(params=2.630, gflops=1.075, ssim=(0.762, 0.075), psnr=(29.78, 2.52),
                            lpips=(0.274, 0.006)),
}

SEED_COLUMNS = ("SSIM (std)", "PSNR (std)", "LPIPS (std)", "Phase error rad (std)")

SHORT = {"Efficient U-Net": "Eff. U-Net", "U-Net (fastMRI)": "U-Net (fM)", "Kronecker U-Net (fastMRI)": "Kron U-Net (fM)",
         "Kronecker U-Net (fastMRI, complex algebra)": "Kron U-Net (fM, cplx)"}

COLUMNS = ["Model", "Protocol", "Acc.", "Params (M)", "FLOPs (G)", "SSIM (std)", "PSNR (std)", "LPIPS (std)",
           "Phase error rad (std)", "Train time", "Steps",
           "Paper Params (M)", "Paper FLOPs (G)", "Paper SSIM (std)", "Paper PSNR (std)", "Paper LPIPS (std)"]


def _ms(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ({std:.{digits}f})" if std is not None else f"{mean:.{digits}f}"


def _pm(summary: SeedSummary | None, digits: int) -> str:
    """mean ± std over seeds (n/a when the metric is missing)."""
    return "n/a" if summary is None else f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def select_rows(models: str | None, preset: Preset) -> list[tuple[str, str | None, int, str]]:
    """Zero-filling plus the preset's default rows (``Preset.table_rows``; every row when it names none),
    narrowed to the comma-separated model families in ``models``; a family the defaults leave out (e.g. the
    demo's ``unet_ddpm``) brings every row of its own."""
    default = [row for row in ROWS[1:] if preset.table_rows is None or row[0] in preset.table_rows]
    if models is None:
        return [ROWS[0], *default]
    families = [f.strip() for f in models.split(",") if f.strip()]
    known = sorted({family for _, family, *_ in ROWS if family})
    unknown = [f for f in families if f not in known]
    if unknown or not families:
        raise RecipeError(f"--models takes model families separated by commas, from {known}; got {models!r}")
    in_default = {row[1] for row in default}
    return [row for row in ROWS if row[1] is None or
            (row[1] in families and (row in default or row[1] not in in_default))]


def dense_row_of(label: str, rows: list[tuple[str, str | None, int, str]]) -> str | None:
    """The dense row a Kronecker row is compared with (same family, kron_n 0), if it is in ``rows``."""
    family, kron_n = next((f, n) for lab, f, n, _ in rows if lab == label)
    if not kron_n:
        return None
    return next((lab for lab, f, n, _ in rows if f == family and n == 0), None)


def table_row(label: str, protocol: str, acc: int, m: dict[str, Any], over: RowOverSeeds | None = None) -> list[str]:
    """One table row from a metrics.json dict (zero-filled: no params, FLOPs or time); with ``over`` (several
    seeds) the metrics are mean ± std over the seeds and the train time is the mean per seed."""
    p = PAPER.get(label, {})
    params = m.get("params")
    if over is not None and len(over.seeds) > 1:
        s = over.summaries
        metrics = [_pm(s.get("ssim"), 3), _pm(s.get("psnr"), 2), _pm(s.get("lpips"), 3), _pm(s.get("phase_error"), 3)]
        seconds = float(np.mean([r["train_seconds"] for r in over.runs]))
    else:
        metrics = [_ms(m["ssim_mean"], m["ssim_std"], 3), _ms(m["psnr_mean"], m["psnr_std"], 2),
                   _ms(m.get("lpips_mean"), m.get("lpips_std"), 3),
                   _ms(m["phase_error_mean"], m.get("phase_error_std"), 3)]
        seconds = m.get("train_seconds")
    return [
        label, protocol, f"{acc}x",
        f"{params / 1e6:.4f}" if params is not None else "-",
        f"{m['gflops']:.4f}" if m.get("gflops") is not None else "-",
        *metrics, _duration(seconds), str(m.get("steps") or "-"),
        f"{p['params']:.3f}" if p.get("params") else "-", f"{p['gflops']:.3f}" if p.get("gflops") else "-",
        _ms(*p["ssim"], 3) if p else "-", _ms(*p["psnr"], 2) if p else "-", _ms(*p["lpips"], 3) if p else "-",
    ]


def _zero_filled_result(acc: MetricsAccumulator) -> dict[str, Any]:
    return {**acc.summary(), "params": None, "gflops": None, "train_seconds": None, "steps": None}


def json_row(label: str, protocol: str, acc: int, m: dict[str, Any], display: dict[str, str],
             over: RowOverSeeds | None = None, dense: str | None = None,
             paired: dict[str, PairedComparison] | None = None,
             seed_level: dict[str, SeedComparison] | None = None) -> dict[str, Any]:
    """One table1.json row: the numbers as numbers (mean and std as floats, None when n/a) beside the display
    strings of the markdown/CSV table. With several seeds ``mean``/``std`` are over the seeds (``std_over``
    says which); ``seeds`` has each seed's means; a Kronecker row has its paired comparison with ``dense_row``
    over the test volumes (``paired``) and, with several seeds, Welch's test of the seeds' means (``seed_level``)."""
    p = PAPER.get(label)
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
            "params_m": p["params"], "gflops": p["gflops"],
            **{k: {"mean": p[k][0], "std": p[k][1]} for k in ("ssim", "psnr", "lpips")}},
        "display": display,
    }


def _interval(interval: tuple[float, float] | None, digits: int, missing: str = "-") -> str:
    return missing if interval is None else f"{interval[0]:+.{digits}f} to {interval[1]:+.{digits}f}"


def paired_cells(paired: dict[str, PairedComparison] | None,
                 seed_level: dict[str, SeedComparison] | None = None) -> dict[str, str]:
    """The paired comparison's CSV cells (empty for rows without one)."""
    cells = {}
    for metric, digits in (("psnr", 2), ("ssim", 3)):
        c = (paired or {}).get(metric)
        w = (seed_level or {}).get(metric)
        name = metric.upper()
        cells.update({f"{name} diff vs dense": "" if c is None else f"{c.mean_difference:+.{digits}f}",
                      f"{name} diff 95% t-CI": "" if c is None else _interval(c.t_ci, digits, ""),
                      f"{name} diff 95% bootstrap CI": "" if c is None else _interval(c.bootstrap_ci, digits, ""),
                      f"{name} Wilcoxon p": "" if c is None else f"{c.wilcoxon_p:.3g}",
                      f"{name} distinguishable": "" if c is None else ("yes" if c.distinguishable else "no"),
                      f"{name} seed-level Welch p": "" if w is None or w.p_value is None else f"{w.p_value:.3g}"})
    return cells


PAIRED_COLUMNS = list(paired_cells(None))


def paired_table(labels: list[str], dense_of: dict[str, str], paired: dict[str, dict[str, PairedComparison]],
                 n_seeds: int, acc: int, seed_level: dict[str, dict[str, SeedComparison]] | None = None) -> list[str]:
    """The markdown section with every Kronecker row's paired comparison with its dense row."""
    if not paired:
        return []
    several = n_seeds > 1 and bool(seed_level)
    lines = [f"## Kronecker minus dense, paired over the test volumes ({acc}x, {n_seeds} seed"
             f"{'s' if n_seeds > 1 else ''})", "",
             "| Kronecker row | Dense row | Volumes | PSNR diff (dB) | 95 % t-CI | 95 % bootstrap CI | Wilcoxon p | "
             "SSIM diff | 95 % t-CI | Wilcoxon p | PSNR difference |"
             + (" Over seeds: PSNR (Welch) |" if several else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if several else "")]
    for label in labels:
        if label not in paired:
            continue
        p, s = paired[label]["psnr"], paired[label]["ssim"]
        lines.append(f"| {label} | {dense_of[label]} | {p.n} | {p.mean_difference:+.2f} | {_interval(p.t_ci, 2)} | "
                     f"{_interval(p.bootstrap_ci, 2)} | {p.wilcoxon_p:.3g} | {s.mean_difference:+.3f} | "
                     f"{_interval(s.t_ci, 3)} | {s.wilcoxon_p:.3g} | {p.verdict} |"
                     + (f" {seed_level[label]['psnr'].format(2)} |" if several else ""))
    notes = sorted({n for comparisons in paired.values() for n in comparisons["psnr"].notes})
    lines += ["", "Differences are Kronecker minus dense on the same test volumes (positive favours Kronecker); "
              + ("each volume's metric is first averaged over the seeds, then the volumes are paired. "
                 if n_seeds > 1 else "one seed per row. ")
              + "t-CI: Student t on the per-volume differences; bootstrap: percentile, 9,999 resamples; Wilcoxon: "
              "two-sided signed-rank (scipy.stats). A difference is called distinguishable from zero only when the "
              "t-CI excludes 0 and Wilcoxon p < 0.05."
              + (" The volume-paired test treats the seed-averaged models as fixed; 'Over seeds' asks whether the "
                 "difference is larger than the seed-to-seed spread: Welch's t-test of the rows' per-seed test "
                 "means (scipy.stats.ttest_ind), with few seeds a weak test." if several else ""),
              *(f"- {n}" for n in notes), ""]
    return lines


def _magnitude(x: np.ndarray) -> np.ndarray:
    return np.sqrt(x[0] ** 2 + x[1] ** 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, variants=False)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, 2 steps per model (tests)")
    parser.add_argument("--accelerations", type=int, nargs="+", choices=(4, 8, 16), default=None,
                        help="accelerations to run (default: the preset's: paper 8x and 4x, demo 4x only)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train every row with N seeds (--seed, --seed + 1, ...): rows report mean ± std over "
                             "seeds, runs go to runs/<acc>x/<model>/seed<s>/ when N > 1")
    parser.add_argument("--models", default=None, metavar="FAMILY[,FAMILY...]",
                        help="run only the preset's rows of these model families (zero-filling always; a family "
                             "the preset's default rows leave out brings all its rows), e.g. unet,swinmr,modl")
    parser.set_defaults(acceleration=None)  # the shared single-run flag; table1 takes --accelerations
    args = parser.parse_args(argv)
    if args.acceleration is not None:
        parser.error("table1 runs several accelerations: use --accelerations 4 8 (not --acceleration)")
    if args.tiny:
        args.preset = "tiny"
        args.max_steps = args.max_steps or 2
    start = time.perf_counter()
    try:
        if args.seeds < 1:
            raise RecipeError(f"--seeds must be >= 1, got {args.seeds}")
        seeds = seed_list(args.seed, args.seeds)
        preset = resolve_preset(args)
        rows = select_rows(args.models, preset)
        jobs = resolve_jobs(args, preset)
        protocol = get_protocol(preset.protocol)
        out = Path(args.out) if args.out else default_out("table1", preset)
        accelerations = args.accelerations or list(preset.accelerations)
        lines, csv_rows, json_rows, notes, sections = [], [], [], [], []
        phases: dict[str, float] = {}  # where the wall time went (table1.md's "Wall time" line)
        reconciliation = reconciliation_note(preset)  # before training: a failure here costs no training time
        tick = _lap(phases, "Table 1 counts of the official configurations", start)
        for acc in accelerations:
            data = prepare_data(args, preset, out / "split.json", acc)
            test = data.datasets["test"]
            zf_acc = zero_filled_metrics(test, preset.eval_batch_size)
            results: dict[str, dict[str, Any]] = {"Zero-filled": _zero_filled_result(zf_acc)}
            over: dict[str, RowOverSeeds] = {}
            indices = example_indices(test, 2)
            zf_examples = reconstruct_examples(None, test, indices)
            panels = [{"target": _magnitude(e["target"]), "zero-filled": _magnitude(e["zero_filled"])}
                      for e in zf_examples]
            histories: dict[str, dict[str, tuple[list, list]]] = {}
            row_dirs = {label: out / "runs" / f"{acc}x" / variant_name(preset.model(family).zoo_name, kron_n, algebra)
                        for label, family, kron_n, algebra in rows[1:]}
            calls = []
            for label, family, kron_n, algebra in rows[1:]:
                for seed in seeds:
                    run_dir = seed_run_dir(row_dirs[label], seed, len(seeds))
                    if args.resume and (run_dir / "metrics.json").is_file():
                        print(f"{label} {acc}x seed {seed}: reusing its finished run", flush=True)
                        continue
                    calls.append(((argparse.Namespace(**{**vars(args), "seed": seed}), preset, data, family, kron_n,
                                   algebra, acc, run_dir), {"zero_filled": zf_acc}))
            tick = _lap(phases, "data and zero-filled scores", tick)
            if not all(train_calls(args, jobs, calls)):  # a non-zero rank in DDP: rank 0 writes the table
                continue
            tick = _lap(phases, f"training and testing the runs ({jobs} at a time)", tick)
            for label, family, kron_n, algebra in rows[1:]:
                run_dirs = [seed_run_dir(row_dirs[label], seed, len(seeds)) for seed in seeds]
                over[label] = row_over_seeds(run_dirs, seeds)
                results[label] = over[label].first
                ex = np.load(run_dirs[0] / "examples.npz")
                for panel, output in zip(panels, ex["output"]):
                    panel[SHORT.get(label, label.replace("Kronecker", "Kron"))] = _magnitude(output)
                history = json.loads((run_dirs[0] / "history.json").read_text())
                histories.setdefault(family, {})[label] = ([h["step"] for h in history],
                                                           [h["val_psnr"] for h in history])
            labels = [label for label, *_ in rows]
            dense_of = {label: dense for label in labels if (dense := dense_row_of(label, rows))}
            paired = {label: compare_rows(over[label], over[dense]) for label, dense in dense_of.items()}
            seed_level = {label: compare_seed_means(over[label], over[dense]) for label, dense in dense_of.items()}
            for label in labels:
                row = table_row(label, protocol.name, acc, results[label], over.get(label))
                lines.append(row)
                csv_rows.append({**dict(zip(COLUMNS, row)),
                                 "Seeds": len(seeds) if label in over else "",
                                 "Std over": "seeds" if label in over and len(seeds) > 1 else
                                 results[label].get("metrics_over") or "volumes",
                                 **paired_cells(paired.get(label), seed_level.get(label))})
                json_rows.append(json_row(label, protocol.name, acc, results[label], dict(zip(COLUMNS, row)),
                                          over.get(label), dense_of.get(label), paired.get(label),
                                          seed_level.get(label)))
            sections += paired_table(labels, dense_of, paired, len(seeds), acc, seed_level)
            comparison_figure(out / f"comparison_{acc}x.png", panels,
                              row_titles=[f"{e['fname']} #{e['slice_num']}" for e in zf_examples],
                              title=f"Test slices at {acc}x, {protocol.name} protocol: reconstructions (top) and "
                                    "|error| (bottom)" + (f", seed {seeds[0]}" if len(seeds) > 1 else ""))
            val_zf = zero_filled_metrics(data.datasets["val"], preset.eval_batch_size).summary()["psnr_mean"]
            pairs = {fam: h for fam, h in histories.items() if len(h) > 1}  # families with a Kronecker row
            if pairs:
                curves_figure(out / f"curves_{acc}x.png",
                              {f"{fam}: validation PSNR (dB)": h for fam, h in pairs.items()},
                              title=f"Validation PSNR (EMA weights) vs step at {acc}x, {protocol.name} protocol, "
                                    "dense vs Kronecker" + (f", seed {seeds[0]}" if len(seeds) > 1 else ""),
                              styles={lab: ("--s" if "Kronecker" in lab else "-o") for h in pairs.values()
                                      for lab in h},
                              references={f"{fam}: validation PSNR (dB)": {"zero-filled": val_zf} for fam in pairs})
            notes.append(next((results[label].get("lpips_message") for label in labels[1:]), None))
        if not lines:
            return 0
        _lap(phases, "comparisons, figures and tables", tick)
        wall = time.perf_counter() - start
        write_table(out, preset, lines, csv_rows, json_rows, accelerations, notes, data.is_demo, wall, argv,
                    reconciliation, seeds=seeds, sections=sections, jobs=jobs, phases=phases)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def _lap(phases: dict[str, float], name: str, since: float) -> float:
    """Add the time since ``since`` to ``phases[name]``; returns now."""
    now = time.perf_counter()
    phases[name] = phases.get(name, 0.0) + now - since
    return now


def unet_rows_note(labels: set[str]) -> str:
    """What the table's U-Net rows are (the paper's DDPM-style U-Net, fastMRI's, or both)."""
    ddpm = "U-Net" in labels or "Kronecker U-Net" in labels
    fastmri = any(label.startswith(("U-Net (fastMRI)", "Kronecker U-Net (fastMRI")) for label in labels)
    parts = (["`U-Net`/`Kronecker U-Net` are the paper's DDPM-style U-Net (zoo `unet_ddpm`, Kronecker version as the "
              "official PHUNet)"] if ddpm else []) + (["`U-Net (fastMRI)` rows are fastMRI's U-Net"] if fastmri else [])
    if fastmri and not ddpm:
        parts.append("the paper's DDPM-style U-Net rows run with `--models unet_ddpm`")
    return "- U-Net rows: " + "; ".join(parts) + "." if parts else "- U-Net rows: none in this table."


def reconciliation_note(preset) -> list[str]:
    """The paper's Table 1 counts beside ours for its official configurations (zoo.paper_reference, ~20 s on a
    CPU); the tiny preset (tests) only points to the command."""
    try:
        from zoo.paper_reference import reconciliation_table
    except ImportError:  # not part of this checkout
        return []
    if preset.name == "tiny":
        return ["", "Table 1's parameter and FLOP counts against the official configurations: "
                "`python -m zoo.paper_reference` (docs/mri.md reproduces its output)."]
    _, markdown = reconciliation_table(320)
    return ["", "## Table 1's counts against the official configurations (zoo.paper_reference)", "", markdown]


def protocol_note(protocol) -> str:
    """One line naming the protocol and what it fixes."""
    if protocol.name == "paper":
        return ("- Protocol `paper` (the official HyperKron code): PD volumes; each slice's complex crop normalised by "
                "its max magnitude; k-space = its FFT; ONE fixed RandomMaskFunc mask (seed 0) over the crop's columns "
                "for training and testing (saved as mask_*.npy); SwinMR trained on 192x192 patches (paper preset); "
                "SSIM/PSNR per slice with data range = that slice's target max, mean (std) over slices. The paper's "
                "published numbers use this protocol.")
    return ("- Protocol `fastmri` (fastMRI's transforms): PD volumes; masks over the raw k-space width, then the "
            "centre crop of the inverse FFT; random masks in training, seeded per file for validation/test; "
            "fastMRI volume SSIM/PSNR/NMSE with data range = the evaluated target volume's max, mean (std) over "
            "volumes (phase error and LPIPS: per-volume means of slice values).")


def write_table(out: Path, preset, lines: list[list[str]], csv_rows: list[dict], json_rows: list[dict],
                accelerations: list[int], notes: list, is_demo: bool, wall: float, argv: list[str] | None,
                reconciliation: list[str] = (), *, seeds: list[int] = (0,), sections: list[str] = (),
                jobs: int = 1, phases: dict[str, float] | None = None) -> None:
    """table1.md (with the command, machine, caveats and the paired comparisons in ``sections``), table1.csv,
    table1.json, and the table on stdout."""
    protocol = get_protocol(preset.protocol)
    command = "python recipes/table1.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
    header = COLUMNS if len(seeds) == 1 else [c.replace("(std)", "(± std over seeds)") if c in SEED_COLUMNS else c
                                              for c in COLUMNS]
    widths = [max(len(c), *(len(r[i]) for r in lines)) for i, c in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    table = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines]
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
          + ("; " + ", ".join(f"{name} {_duration(sec)}" for name, sec in phases.items()) if phases else ""), "",
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


if __name__ == "__main__":
    sys.exit(main())
