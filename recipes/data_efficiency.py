"""The paper's generalisation claim: dense vs Kronecker U-Net trained on 10%, 50% and 100% of the training volumes.

    python recipes/data_efficiency.py                              # demo data, CPU
    python recipes/data_efficiency.py --data-path /data/fastmri    # paper preset (GPU)
    python recipes/data_efficiency.py --family swinmr --fractions 0.25 1.0

Every run trains for the same number of steps on a seeded subset of the training data and is tested on the same
validation and test volumes. The subset is drawn by volume under the fastmri protocol (at least one volume) and by
slice under the paper protocol (at least one slice), as the official code's reduced training sets are. Writes OUT/data_efficiency.md and .csv (final test
metrics), OUT/curves.png (validation loss and PSNR vs step) and the runs under OUT/runs/<fraction>/<model>/.
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
    default_out,
    prepare_data,
    resolve_preset,
    train_and_evaluate,
    variant_name,
)
from kronify.mri.data import SliceSubset
from kronify.mri.evaluate import zero_filled_metrics
from kronify.mri.figures import curves_figure
from kronify.mri.presets import FAMILIES
from kronify.mri.protocol import get_protocol

COLUMNS = ["Fraction", "Train volumes", "Train slices", "Model", "Params (M)", "SSIM (std)", "PSNR (std)", "NMSE",
           "Phase error rad", "Final val loss", "Final val PSNR", "Train time"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, variants=False)
    parser.add_argument("--family", choices=FAMILIES, default="unet", help="model family (dense vs Kronecker)")
    parser.add_argument("--kron-n", type=int, default=2, help="Kronecker n of the compared model")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5, 1.0],
                        help="fractions of the training volumes")
    args = parser.parse_args(argv)
    args.algebra = "learned"
    start = time.perf_counter()
    try:
        if any(not 0 < f <= 1 for f in args.fractions):
            raise RecipeError(f"--fractions must lie in (0, 1], got {args.fractions}")
        if args.kron_n < 2:
            raise RecipeError(f"--kron-n must be >= 2 for the Kronecker model, got {args.kron_n}")
        preset = resolve_preset(args)
        protocol = get_protocol(preset.protocol)
        if args.acceleration is None:
            args.acceleration = preset.accelerations[0]
        spec = preset.model(args.family)
        out = Path(args.out) if args.out else default_out(f"data_efficiency-{args.family}", preset)
        data = prepare_data(args, preset, out / "split.json", args.acceleration)
        zf = zero_filled_metrics(data.datasets["test"], preset.eval_batch_size)
        rows, loss_curves, psnr_curves = [], {}, {}
        for fraction in sorted(set(args.fractions)):
            part = subset(data, fraction, args.seed, protocol.train_subset)
            volumes, slices = len(part.datasets["train"].files), len(part.datasets["train"])
            for n in (0, args.kron_n):
                name = variant_name(spec.zoo_name, n, "learned")
                run_dir = out / "runs" / f"{fraction:g}" / name
                if args.resume and (run_dir / "metrics.json").is_file():
                    result = json.loads((run_dir / "metrics.json").read_text())
                else:
                    result = train_and_evaluate(args, preset, part, args.family, n, "learned", args.acceleration,
                                                run_dir, zero_filled=zf)
                if not result:  # non-zero DDP rank
                    continue
                history = json.loads((run_dir / "history.json").read_text())
                label = f"{'Kronecker' if n else 'dense'} {fraction:.0%} ({volumes} vol)"
                steps = [h["step"] for h in history]
                loss_curves[label] = (steps, [h["val_loss"] for h in history])
                psnr_curves[label] = (steps, [h["val_psnr"] for h in history])
                last = history[-1] if history else {}
                rows.append([f"{fraction:.0%}", str(volumes), str(slices), name, f"{result['params'] / 1e6:.4f}",
                             f"{result['ssim_mean']:.3f} ({result['ssim_std']:.3f})",
                             f"{result['psnr_mean']:.2f} ({result['psnr_std']:.2f})", f"{result['nmse_mean']:.4f}",
                             f"{result['phase_error_mean']:.3f}", f"{last.get('val_loss', float('nan')):.4f}",
                             f"{last.get('val_psnr', float('nan')):.2f}", f"{result['train_seconds']:.0f} s"])
        if not rows:
            return 0
        styles = {label: ("--s" if label.startswith("Kronecker") else "-o") for label in loss_curves}
        curves_figure(out / "curves.png", {"validation loss": loss_curves, "validation PSNR (dB)": psnr_curves},
                      title=f"{spec.zoo_name} dense vs Kronecker (n={args.kron_n}) by training-set size, "
                            f"{args.acceleration}x, {protocol.name} protocol", styles=styles)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        table = [fmt(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]
        zfs = zf.summary()
        md = [f"# Data efficiency: {spec.zoo_name} dense vs Kronecker ({preset.name} preset, {protocol.name} "
              f"protocol, {args.acceleration}x)",
              "", *table, "",
              f"Zero-filled test SSIM {zfs['ssim_mean']:.3f}, PSNR {zfs['psnr_mean']:.2f} dB. Every run: "
              f"{args.max_steps or preset.steps_for(args.family)} steps, batch {preset.batch_size}; same validation "
              f"and test volumes; training subsets drawn by {protocol.train_subset}; {protocol.title}."
              + (" Demo data (brain, not knee)." if data.is_demo else ""),
              "", "![curves](curves.png)", ""]
        (out / "data_efficiency.md").write_text("\n".join(md) + "\n")
        with open(out / "data_efficiency.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
        print("\n".join(table))
        print(f"\nwrote {out / 'data_efficiency.md'} ({(time.perf_counter() - start) / 60:.1f} min)")
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
