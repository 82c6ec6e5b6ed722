"""Reproduce the paper's Table 1: zero-filling, LB U-Net, Efficient U-Net, U-Net, Kronecker U-Net (learned and
fixed complex algebra), SwinMR, Kronecker SwinMR, MoDL and Kronecker MoDL, trained and tested on the same split.

    python recipes/table1.py --preset demo                  # `make demo`: demo data, 2 CPU cores, ~15 min, 4x only
    python recipes/table1.py --data-path /data/fastmri      # the paper preset at 4x and 8x (GPU)
    python recipes/table1.py --tiny --out /tmp/t1           # every row in seconds (tests)

Writes OUT/table1.md and OUT/table1.csv (our numbers, the paper's published values in side columns),
OUT/comparison_<acc>x.png (reconstructions and error maps of every model on the same test slices),
OUT/curves_<acc>x.png (validation PSNR vs step, dense vs Kronecker) and every run under OUT/runs/<acc>x/<model>/.
With --resume finished rows are reused and unfinished ones continue from their last checkpoint.
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

from _common import RecipeError, add_arguments, prepare_data, resolve_preset, train_and_evaluate, variant_name
from kronify.mri.evaluate import (
    example_indices,
    machine_description,
    reconstruct_examples,
    write_json,
    zero_filled_metrics,
)
from kronify.mri.figures import comparison_figure, curves_figure
from kronify.mri.metrics import MetricsAccumulator

# (label, family, kron_n, algebra); family None is zero-filling.
ROWS: list[tuple[str, str | None, int, str]] = [
    ("Zero-filled", None, 0, "learned"),
    ("LB U-Net", "lbunet", 0, "learned"),
    ("Efficient U-Net", "efficient_unet", 0, "learned"),
    ("U-Net", "unet", 0, "learned"),
    ("Kronecker U-Net", "unet", 2, "learned"),
    ("Kronecker U-Net (complex algebra)", "unet", 2, "complex"),
    ("SwinMR", "swinmr", 0, "learned"),
    ("Kronecker SwinMR", "swinmr", 2, "learned"),
    ("MoDL", "modl", 0, "learned"),
    ("Kronecker MoDL", "modl", 2, "learned"),
]

# The paper's Table 1 (/work/shared/seeds/000_82e303a2590c0f8d.txt): params (M), FLOPs (G), SSIM, PSNR, LPIPS
# as mean (std). Its text does not state which acceleration the table is for; it has no U-Net, SwinMR, MoDL,
# Kronecker MoDL or complex-algebra rows. (Its LB U-Net SSIM repeats the zero-filled value, as printed.)
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

SHORT = {"Efficient U-Net": "Eff. U-Net", "Kronecker U-Net (complex algebra)": "Kron U-Net (cplx)"}

COLUMNS = ["Model", "Acc.", "Params (M)", "FLOPs (G)", "SSIM (std)", "PSNR (std)", "LPIPS (std)",
           "Phase error rad (std)", "Train time", "Steps",
           "Paper Params (M)", "Paper FLOPs (G)", "Paper SSIM (std)", "Paper PSNR (std)", "Paper LPIPS (std)"]


def _ms(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ({std:.{digits}f})" if std is not None else f"{mean:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table_row(label: str, acc: int, m: dict[str, Any]) -> list[str]:
    """One table row from a metrics.json dict (zero-filled: no params, FLOPs or time)."""
    p = PAPER.get(label, {})
    params = m.get("params")
    return [
        label, f"{acc}x",
        f"{params / 1e6:.4f}" if params is not None else "-",
        f"{m['gflops']:.4f}" if m.get("gflops") is not None else "-",
        _ms(m["ssim_mean"], m["ssim_std"], 3), _ms(m["psnr_mean"], m["psnr_std"], 2),
        _ms(m.get("lpips_mean"), m.get("lpips_std"), 3), _ms(m["phase_error_mean"], m.get("phase_error_std"), 3),
        _duration(m.get("train_seconds")), str(m.get("steps") or "-"),
        f"{p['params']:.3f}" if p.get("params") else "-", f"{p['gflops']:.3f}" if p.get("gflops") else "-",
        _ms(*p["ssim"], 3) if p else "-", _ms(*p["psnr"], 2) if p else "-", _ms(*p["lpips"], 3) if p else "-",
    ]


def _zero_filled_result(acc: MetricsAccumulator) -> dict[str, Any]:
    return {**acc.summary(), "params": None, "gflops": None, "train_seconds": None, "steps": None}


def _magnitude(x: np.ndarray) -> np.ndarray:
    return np.sqrt(x[0] ** 2 + x[1] ** 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, variants=False)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, 2 steps per model (tests)")
    parser.add_argument("--accelerations", type=int, nargs="+", choices=(4, 8), default=None,
                        help="accelerations to run (default: the preset's; demo runs 4x only)")
    parser.set_defaults(acceleration=None)  # the shared single-run flag; table1 takes --accelerations
    args = parser.parse_args(argv)
    if args.acceleration is not None:
        parser.error("table1 runs several accelerations: use --accelerations 4 8 (not --acceleration)")
    if args.tiny:
        args.preset = "tiny"
        args.max_steps = args.max_steps or 2
    start = time.perf_counter()
    try:
        preset = resolve_preset(args)
        out = Path(args.out or f"out/table1-{preset.name}")
        accelerations = args.accelerations or list(preset.accelerations)
        lines, csv_rows, notes = [], [], []
        for acc in accelerations:
            data = prepare_data(args, preset, out / "split.json", acc)
            test = data.datasets["test"]
            zf_acc = zero_filled_metrics(test, preset.eval_batch_size)
            results: dict[str, dict[str, Any]] = {"Zero-filled": _zero_filled_result(zf_acc)}
            indices = example_indices(test, 2)
            zf_examples = reconstruct_examples(None, test, indices)
            panels = [{"target": _magnitude(e["target"]), "zero-filled": _magnitude(e["zero_filled"])}
                      for e in zf_examples]
            histories: dict[str, dict[str, tuple[list, list]]] = {}
            for label, family, kron_n, algebra in ROWS[1:]:
                spec = preset.model(family)
                run_dir = out / "runs" / f"{acc}x" / variant_name(spec.zoo_name, kron_n, algebra)
                metrics_file = run_dir / "metrics.json"
                if args.resume and metrics_file.is_file():
                    result = json.loads(metrics_file.read_text())
                    print(f"{label} {acc}x: reusing {metrics_file}", flush=True)
                else:
                    result = train_and_evaluate(args, preset, data, family, kron_n, algebra, acc, run_dir,
                                                zero_filled=zf_acc)
                if not result:  # a non-zero rank in DDP: rank 0 writes the table
                    continue
                results[label] = result
                ex = np.load(run_dir / "examples.npz")
                for panel, output in zip(panels, ex["output"]):
                    panel[SHORT.get(label, label.replace("Kronecker", "Kron"))] = _magnitude(output)
                history = json.loads((run_dir / "history.json").read_text())
                histories.setdefault(family, {})[label] = ([h["step"] for h in history],
                                                           [h["val_psnr"] for h in history])
            if not results.get("U-Net"):
                continue
            for label, *_ in ROWS:
                row = table_row(label, acc, results[label])
                lines.append(row)
                csv_rows.append(dict(zip(COLUMNS, row)))
            comparison_figure(out / f"comparison_{acc}x.png", panels,
                              row_titles=[f"{e['fname']} #{e['slice_num']}" for e in zf_examples],
                              title=f"Test slices at {acc}x: reconstructions (top) and |error| (bottom)")
            val_zf = zero_filled_metrics(data.datasets["val"], preset.eval_batch_size).summary()["psnr_mean"]
            pairs = {fam: h for fam, h in histories.items() if len(h) > 1}  # families with a Kronecker row
            curves_figure(out / f"curves_{acc}x.png",
                          {f"{fam}: validation PSNR (dB)": h for fam, h in pairs.items()},
                          title=f"Validation PSNR (EMA weights) vs step at {acc}x, dense vs Kronecker",
                          styles={lab: ("--s" if "Kronecker" in lab else "-o") for h in pairs.values() for lab in h},
                          references={f"{fam}: validation PSNR (dB)": {"zero-filled": val_zf} for fam in pairs})
            notes.append(results["U-Net"].get("lpips_message"))
        if not lines:
            return 0
        wall = time.perf_counter() - start
        write_table(out, preset, lines, csv_rows, accelerations, notes, data.is_demo, wall, argv)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def write_table(out: Path, preset, lines: list[list[str]], csv_rows: list[dict],
                accelerations: list[int], notes: list, is_demo: bool, wall: float, argv: list[str] | None) -> None:
    """table1.md (with the command, machine and caveats), table1.csv, and the table on stdout."""
    command = "python recipes/table1.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
    widths = [max(len(c), *(len(r[i]) for r in lines)) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    table = [fmt(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines]
    caveats = [
        f"- Preset `{preset.name}`: {preset.description}. Crop {preset.crop}x{preset.crop}, global batch "
        f"{preset.batch_size}, Adam lr {preset.lr:g}, EMA {preset.ema_decay} (warm-up), loss alpha {preset.alpha:g} / "
        f"beta {preset.beta:g} / gamma {preset.gamma:g}"
        + (" (perceptual term off: no VGG19 weights are shipped)." if preset.gamma == 0 else "."),
        *([f"- Short-run aids (demo/tiny presets): random global phase per training sample (exact for MRI data) "
           "and every model wrapped so it starts from the zero-filled image (one extra scalar parameter, "
           "kronify.mri.training.ZeroFilledStart). The paper preset uses neither."]
          if preset.phase_augment or preset.zero_filled_start else []),
        f"- Accelerations run: {', '.join(f'{a}x' for a in accelerations)}"
        + (" (the demo preset runs 4x only to fit its time budget)." if preset.name == "demo" else "."),
        f"- FLOPs: one 2x{preset.crop}x{preset.crop} slice (torch.utils.flop_counter, 2*MAC, Kronecker models "
        "after kronify.merge); the paper's column is at 320x320 with its own models, so only the paper preset is "
        "comparable.",
        "- SSIM/PSNR/phase error: mean (std) over test slices, fastMRI metrics on magnitudes with the volume max "
        "as data range; phase error = mean |wrapped phase difference| where |target| > 10% of the slice max.",
        "- Train time: wall time of training incl. validation. Every model is evaluated with its EMA weights.",
        "- Paper columns: the paper's Table 1 as published (it does not state the acceleration; it has no U-Net, "
        "SwinMR, MoDL, Kronecker MoDL or complex-algebra rows).",
    ]
    if is_demo:
        caveats.insert(0, "- DATA: the kronify demo dataset (MNI152 brain, synthetic phase and noise), NOT fastMRI "
                          "knee: these numbers check the pipeline and compare models with each other, they are not "
                          "a reproduction of the paper's values.")
    lp = next((n for n in notes if n), None)
    if lp:
        caveats.append(f"- LPIPS n/a: {lp}")
    md = [f"# Table 1 ({preset.name} preset)", "", f"Command: `{command}`", "",
          f"Machine: {machine_description()}", "", f"Wall time: {wall / 60:.1f} min (including data preparation)", "",
          *table, "", *caveats, "",
          *(f"![comparison {a}x](comparison_{a}x.png)\n\n![curves {a}x](curves_{a}x.png)\n" for a in accelerations)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text("\n".join(md) + "\n")
    with open(out / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows)
    write_json(out / "table1.json", {"command": command, "machine": machine_description(), "wall_seconds": wall,
                                     "rows": csv_rows})
    print("\n".join(table))
    print(f"\nwrote {out / 'table1.md'} and table1.csv ({wall / 60:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
