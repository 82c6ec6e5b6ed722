"""The paper's generalisation claim: dense vs Kronecker models trained on 10%, 25%, 50% and 100% of the training
volumes, with several seeds.

    python recipes/data_efficiency.py                              # demo data, CPU, fastMRI's U-Net
    python recipes/data_efficiency.py --family unet modl --seeds 3   # the demo study (docs/results)
    python recipes/data_efficiency.py --data-path /data/fastmri    # paper preset (GPU)
    python recipes/data_efficiency.py --family swinmr --fractions 0.25 1.0

Every run trains for the same number of steps on a seeded subset of the training data and is tested on the same
validation and test volumes. The subset is drawn by volume under the fastmri protocol (at least one volume) and by
slice under the paper protocol (at least one slice), as the official code's reduced training sets are; with
``--seeds N`` each seed draws its own subset (the dense and Kronecker runs of a seed share it). Writes
OUT/data_efficiency.md, .csv and .json (test metrics, mean ± std over seeds, and each fraction's paired
Kronecker-minus-dense comparison over the test volumes: mean difference, 95 % t and bootstrap CIs, Wilcoxon p),
OUT/psnr_vs_fraction.png (test PSNR vs fraction with ±std error bars), OUT/curves.png (validation loss and PSNR vs
step, first seed) and the runs under OUT/runs/<fraction>/<model>/ (…/seed<s>/ when N > 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from _common import (
    Data,
    RecipeError,
    add_arguments,
    check_variant,
    default_out,
    prepare_data,
    resolve_jobs,
    resolve_preset,
    train_calls,
    variant_name,
)
from kronify.mri.data.datasets import SliceSubset
from kronify.mri.experiments.evaluate import write_json, zero_filled_metrics
from kronify.mri.experiments.figures import curves_figure, errorbar_figure
from kronify.mri.experiments.presets import FAMILIES
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

COLUMNS = ["Family", "Fraction", "Train volumes", "Train slices", "Model", "Params (M)", "Seeds", "SSIM (std)",
           "PSNR (std)", "NMSE", "Phase error rad", "Final val loss", "Final val PSNR", "Train time"]
PAIRED = ["Family", "Fraction", "Train volumes", "Kronecker model", "Dense model", "Test volumes", "PSNR diff (dB)",
          "95 % t-CI", "95 % bootstrap CI", "Wilcoxon p", "SSIM diff", "SSIM 95 % t-CI", "SSIM Wilcoxon p",
          "PSNR difference", "Over seeds: PSNR (Welch)"]


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


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [fmt(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]


def _cell(row: RowOverSeeds, metric: str, digits: int) -> str:
    """mean ± std over seeds, or (one seed) mean (std over the test set)."""
    if len(row.seeds) > 1:
        return row.summaries[metric].format(digits).replace(" (1 seed)", "")
    m = row.first
    std = m.get(f"{metric}_std")
    return f"{m[f'{metric}_mean']:.{digits}f}" + ("" if std is None else f" ({std:.{digits}f})")


def _ci(interval: tuple[float, float] | None, digits: int) -> str:
    return "-" if interval is None else f"{interval[0]:+.{digits}f} to {interval[1]:+.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, variants=False)
    parser.add_argument("--family", choices=FAMILIES, nargs="+", default=["unet"],
                        help="model families (each dense vs Kronecker)")
    parser.add_argument("--kron-n", type=int, default=2, help="Kronecker n of the compared model")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0],
                        help="fractions of the training volumes")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train every run with N seeds (--seed, --seed + 1, ...; each seed draws its own "
                             "training subset, shared by the dense and the Kronecker model)")
    args = parser.parse_args(argv)
    args.algebra = "learned"
    start = time.perf_counter()
    try:
        if any(not 0 < f <= 1 for f in args.fractions):
            raise RecipeError(f"--fractions must lie in (0, 1], got {args.fractions}")
        if args.kron_n < 2:
            raise RecipeError(f"--kron-n must be >= 2 for the Kronecker model, got {args.kron_n}")
        if args.seeds < 1:
            raise RecipeError(f"--seeds must be >= 1, got {args.seeds}")
        seeds = seed_list(args.seed, args.seeds)
        families = list(dict.fromkeys(args.family))
        preset = resolve_preset(args)
        for family in families:
            check_variant(family, preset, args.kron_n, "learned")
        protocol = get_protocol(preset.protocol)
        if args.acceleration is None:
            args.acceleration = preset.accelerations[0]
        stem = "-".join(families)
        out = Path(args.out) if args.out else default_out(f"data_efficiency-{stem}", preset)
        data = prepare_data(args, preset, out / "split.json", args.acceleration)
        zf = zero_filled_metrics(data.datasets["test"], preset.eval_batch_size)
        fractions = sorted(set(args.fractions))
        row_dir = lambda fraction, family, n: (  # noqa: E731
            out / "runs" / f"{fraction:g}" / variant_name(preset.model(family).zoo_name, n, "learned"))
        # seed by seed, so that a study stopped early holds complete seeds (rerun with --resume --seeds K)
        calls = []
        for seed in seeds:
            for family in families:
                for fraction in fractions:
                    part = subset(data, fraction, seed, protocol.train_subset)
                    for n in (0, args.kron_n):
                        run_dir = seed_run_dir(row_dir(fraction, family, n), seed, len(seeds))
                        if not (args.resume and (run_dir / "metrics.json").is_file()):
                            calls.append(((argparse.Namespace(**{**vars(args), "seed": seed}), preset, part, family,
                                           n, "learned", args.acceleration, run_dir), {"zero_filled": zf}))
        if not all(train_calls(args, resolve_jobs(args, preset), calls)):
            return 0  # a non-zero DDP rank: rank 0 writes the tables
        rows, paired_rows, loss_curves, psnr_curves, points, numbers = [], [], {}, {}, {}, []
        for family in families:
            spec = preset.model(family)
            for fraction in fractions:
                train_set = subset(data, fraction, seeds[0], protocol.train_subset).datasets["train"]
                volumes, slices = len(train_set.files), len(train_set)
                by_n: dict[int, RowOverSeeds] = {}
                for n in (0, args.kron_n):
                    name = variant_name(spec.zoo_name, n, "learned")
                    run_dirs = [seed_run_dir(row_dir(fraction, family, n), seed, len(seeds)) for seed in seeds]
                    row = by_n[n] = row_over_seeds(run_dirs, seeds)
                    histories = [json.loads((d / "history.json").read_text()) for d in run_dirs]
                    label = f"{spec.zoo_name} {'Kronecker' if n else 'dense'} {fraction:.0%} ({volumes} vol)"
                    steps = [h["step"] for h in histories[0]]
                    loss_curves[label] = (steps, [h["val_loss"] for h in histories[0]])
                    psnr_curves[label] = (steps, [h["val_psnr"] for h in histories[0]])
                    last = [h[-1] for h in histories if h]
                    final = {key: float(np.mean([h[key] for h in last])) if last else float("nan")
                             for key in ("val_loss", "val_psnr")}  # the last validation, mean over seeds
                    seconds = float(np.mean([r["train_seconds"] for r in row.runs]))
                    rows.append([family, f"{fraction:.0%}", str(volumes), str(slices), name,
                                 f"{row.first['params'] / 1e6:.4f}", str(len(seeds)), _cell(row, "ssim", 3),
                                 _cell(row, "psnr", 2), f"{row.summaries['nmse'].mean:.4f}",
                                 f"{row.summaries['phase_error'].mean:.3f}", f"{final['val_loss']:.4f}",
                                 f"{final['val_psnr']:.2f}", f"{seconds:.0f} s"])
                    psnr = row.summaries["psnr"]
                    points.setdefault(family, {}).setdefault("Kronecker" if n else "dense", []).append(
                        (fraction, psnr.mean, psnr.std))
                    numbers.append({"family": family, "fraction": fraction, "train_volumes": volumes,
                                    "train_slices": slices, "model": name, "kron_n": n,
                                    "params": row.first["params"], **row.as_dict()})
                comparison = compare_rows(by_n[args.kron_n], by_n[0])
                seed_level = compare_seed_means(by_n[args.kron_n], by_n[0])
                p, s = comparison["psnr"], comparison["ssim"]
                paired_rows.append([family, f"{fraction:.0%}", str(volumes), variant_name(spec.zoo_name, args.kron_n,
                                    "learned"), spec.zoo_name, str(p.n), f"{p.mean_difference:+.2f}",
                                    _ci(p.t_ci, 2), _ci(p.bootstrap_ci, 2), f"{p.wilcoxon_p:.3g}",
                                    f"{s.mean_difference:+.3f}", _ci(s.t_ci, 3), f"{s.wilcoxon_p:.3g}", p.verdict,
                                    seed_level["psnr"].format(2)])
                numbers.append({"family": family, "fraction": fraction, "paired": comparison_dicts(comparison),
                                "seed_level": comparison_dicts(seed_level)})
        if not rows:
            return 0
        write_outputs(out, args, preset, protocol, families, seeds, fractions, data.is_demo, zf.summary(), rows,
                      paired_rows, numbers, points, loss_curves, psnr_curves, start)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def write_outputs(out: Path, args: argparse.Namespace, preset, protocol, families: list[str], seeds: list[int],
                  fractions: list[float], is_demo: bool, zfs: dict, rows: list[list[str]], paired_rows: list[list[str]],
                  numbers: list[dict], points: dict, loss_curves: dict, psnr_curves: dict, start: float) -> None:
    """data_efficiency.md/.csv/.json, psnr_vs_fraction.png (test PSNR ± std over seeds) and curves.png."""
    names = ", ".join(preset.model(f).zoo_name for f in families)
    several = len(seeds) > 1
    styles = {label: ("--s" if "Kronecker" in label else "-o") for label in loss_curves}
    curves_figure(out / "curves.png", {"validation loss": loss_curves, "validation PSNR (dB)": psnr_curves},
                  title=f"{names}: dense vs Kronecker (n={args.kron_n}) by training-set size, {args.acceleration}x, "
                        f"{protocol.name} protocol" + (f", seed {seeds[0]}" if several else ""), styles=styles)
    panels = {preset.model(f).zoo_name: {kind: tuple(map(list, zip(*pts))) for kind, pts in points[f].items()}
              for f in families if f in points}
    errorbar_figure(out / "psnr_vs_fraction.png", panels, xlabel="fraction of the training volumes",
                    ylabel="test PSNR (dB)", xticks=fractions, xscale="log",
                    styles={"dense": "-o", "Kronecker": "--s"},
                    references={p: {"zero-filled": zfs["psnr_mean"]} for p in panels},
                    title=f"Test PSNR vs training-set size ({preset.name} preset, {protocol.name} protocol, "
                          f"{args.acceleration}x): " + (f"mean ± std over {len(seeds)} seeds" if several
                                                       else f"one seed ({seeds[0]})"))
    steps = ", ".join(f"{preset.model(f).zoo_name} {args.max_steps or preset.steps_for(f)}" for f in families)
    table = _table(COLUMNS, rows)
    md = [f"# Data efficiency: {names} dense vs Kronecker ({preset.name} preset, {protocol.name} protocol, "
          f"{args.acceleration}x)", "", *table, "",
          f"Zero-filled test SSIM {zfs['ssim_mean']:.3f}, PSNR {zfs['psnr_mean']:.2f} dB. Steps per run: {steps}; "
          f"batch {preset.batch_size}; same validation and test volumes; training subsets drawn by "
          f"{protocol.train_subset}" + (" with each seed's own draw (the dense and Kronecker runs of a seed share "
                                        "it)" if several else "") + f"; {protocol.title}. Seeds: "
          f"{', '.join(map(str, seeds))}; "
          + ("SSIM/PSNR are mean ± std over the seeds of each run's test mean, NMSE/phase error/final validation "
             "values their means over seeds." if several else "SSIM/PSNR are mean (std) over the test set.")
          + (" Demo data (brain, not knee)." if is_demo else ""), ""]
    if paired_rows:
        md += ["## Kronecker minus dense, paired over the test volumes", "", *_table(PAIRED, paired_rows), "",
               "Positive differences favour the Kronecker model. " + ("Each test volume's metric is averaged over "
                                                                       "the seeds before pairing. " if several else "")
               + "t-CI: Student t on the per-volume differences; bootstrap: percentile, 9,999 resamples; Wilcoxon: "
               "two-sided signed-rank (scipy.stats). Distinguishable from zero only when the t-CI excludes 0 and "
               "Wilcoxon p < 0.05. 'Over seeds': Welch's t-test of the two models' per-seed test PSNR (is the "
               "difference larger than the seed-to-seed spread?).", ""]
    md += ["![test PSNR vs fraction](psnr_vs_fraction.png)", "", "![validation curves](curves.png)", ""]
    (out / "data_efficiency.md").write_text("\n".join(md) + "\n")
    with open(out / "data_efficiency.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    write_json(out / "data_efficiency.json", {"preset": preset.name, "protocol": protocol.name,
                                              "acceleration": args.acceleration, "seeds": seeds,
                                              "fractions": fractions, "zero_filled": zfs, "rows": numbers})
    print("\n".join(table))
    if paired_rows:
        print("\n" + "\n".join(_table(PAIRED, paired_rows)))
    print(f"\nwrote {out / 'data_efficiency.md'} ({(time.perf_counter() - start) / 60:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
