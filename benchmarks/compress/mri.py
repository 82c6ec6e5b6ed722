"""The MRI half of the compression study: the demo's trained dense U-Net, MoDL and SwinMR compressed with
``recipes/compress.py``'s orchestration (kronify.mri.experiments.compress.compress_run), over seeds.

    python recipes/table1.py --preset demo --models unet,swinmr,modl --seeds 3 --out RUNS_ROOT   # teachers, scratch
    python -m benchmarks.compress.mri study --table RUNS_ROOT --seeds 3 [--unseen DATA]   # the rows of the study
    python -m benchmarks.compress.mri choices --table RUNS_ROOT --seeds 2 --out STUDY_OUT  # one change at a time
    python -m benchmarks.compress.mri cost --table RUNS_ROOT --seeds 3 --out STUDY_OUT  # fewer steps, batches
    python -m benchmarks.compress.mri matched --table RUNS_ROOT --seeds 3 --families swinmr --out STUDY_OUT

Seed s of every compressed row starts from seed s of the dense run and is compared with it (and with seed s of
the Kronecker model trained from scratch): the volume-paired comparison of the rows' per-volume PSNR averaged
over seeds (t-CI, Wilcoxon; kronify.mri.experiments.study.compare_rows) and a paired t-test over the seeds'
test means (scipy.stats.ttest_rel). ``--unseen DATA`` also scores the dense, from-scratch and both 20 % rows on a
demo-format folder built from another anatomy (docs/results/demo_unseen_anatomy.md). Runs already in --out are
reused. Writes OUT/results-<mode>.md and .json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._common import write_results
from benchmarks.compress.common import fmt, paired_test
from kronify.mri.experiments.compress import CompressSettings, compress_run
from kronify.mri.experiments.evaluate import evaluate_run
from kronify.mri.experiments.jobs import machine_description, run_calls
from kronify.mri.experiments.presets import get_preset
from kronify.mri.experiments.run import Hardware
from kronify.mri.experiments.run_folder import RunRecord
from kronify.mri.experiments.study import compare_rows, row_over_seeds
from zoo.build import compress_models, rebuild_run_model

FAMILIES = {"unet": "unet_demo", "modl": "modl_demo", "swinmr": "swinmr_demo"}
STUDY_FRACTIONS = (0.05, 0.10, 0.20)
BUDGET_ROW = "budget 0.5 + distilled 20%"  # distilled from the teacher alone
BOTH_ROW = "budget 0.5 + distilled 20%, teacher + ground truth"  # the setting make demo's compressed rows use
#: make demo's compressed rows (kronify.mri.experiments.table1.COMPRESSED_SETTINGS), from the cost mode
DEMO_ROW = "budget 0.5 + distilled 10%, teacher + ground truth, 8 calibration batches"
#: BOTH_ROW at the parameter count of the Kronecker model trained from scratch (the matched mode)
MATCHED_ROW = "budget = the from-scratch Kronecker model's size + distilled 20%, teacher + ground truth"
UNSEEN_ROWS = ("calibrated + distilled 20%", BUDGET_ROW, BOTH_ROW, DEMO_ROW, MATCHED_ROW)  # also scored on --unseen


def study_rows(scratch_steps: int) -> dict[str, CompressSettings]:
    """The study's compressed rows for a family whose from-scratch model trains ``scratch_steps``."""
    teacher = CompressSettings(target="teacher")
    rows = {"weight-only warm start, 0 steps": replace(teacher, warm_start="weights", steps=0),
            "calibrated warm start, 0 steps": replace(teacher, steps=0)}
    for f in STUDY_FRACTIONS:
        rows[f"calibrated + distilled {f:.0%}"] = replace(teacher, steps=round(f * scratch_steps))
    rows[BUDGET_ROW] = replace(teacher, budget=0.5, steps=round(0.2 * scratch_steps))
    rows[BOTH_ROW] = replace(rows[BUDGET_ROW], target="both")
    return rows


def choice_rows(scratch_steps: int) -> dict[str, CompressSettings]:
    """One change at a time from ``--budget 0.5`` distilled from the teacher for 20 % of the from-scratch steps;
    the first two rows are the study's, so a choices run into the study's --out reuses its runs."""
    base = CompressSettings(target="teacher", budget=0.5, steps=round(0.2 * scratch_steps))
    return {BUDGET_ROW: base,
            "ground truth only": replace(base, target="ground-truth"),
            BOTH_ROW: replace(base, target="both"),
            "+ feature matching (weight 1)": replace(base, features=1.0),
            "lr 3e-4": replace(base, lr=3e-4),
            "lr 3e-3": replace(base, lr=3e-3),
            "weight-only warm start": replace(base, warm_start="weights")}


def cost_rows(scratch_steps: int) -> dict[str, CompressSettings]:
    """What a cheaper ``make demo`` compression would cost in quality: ``BOTH_ROW`` distilled for fewer steps and
    calibrated on fewer batches (the conversion's time is nearly all the calibration batches' input moments)."""
    base = CompressSettings(target="both", budget=0.5)
    rows = {BOTH_ROW: replace(base, steps=round(0.2 * scratch_steps))}
    for f in (0.05, 0.10):
        rows[f"budget 0.5 + distilled {f:.0%}, teacher + ground truth"] = replace(base, steps=round(f * scratch_steps))
    rows[DEMO_ROW] = replace(base, steps=round(0.1 * scratch_steps), calibration_batches=8)
    rows["budget 0.5 + distilled 20%, teacher + ground truth, 8 calibration batches"] = replace(
        base, steps=round(0.2 * scratch_steps), calibration_batches=8)
    return rows


def matched_rows(scratch_steps: int, size: float) -> dict[str, CompressSettings]:
    """``BOTH_ROW`` against the same at ``size``, the from-scratch Kronecker model's share of the dense parameters:
    a model whose norms and tables stay dense (SwinMR) has its from-scratch Kronecker model above ½ of them."""
    both = CompressSettings(target="both", budget=0.5, steps=round(0.2 * scratch_steps))
    return {BOTH_ROW: both, MATCHED_ROW: replace(both, budget=round(size, 4))}


def unseen_rows(compressed: dict[str, list[Path]]) -> list[Path]:
    """The run folders of the compressed rows that are also scored on another anatomy."""
    return [d for label in UNSEEN_ROWS for d in compressed.get(label, [])]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def _compress(dense: Path, out: Path, settings: CompressSettings, seed: int) -> None:
    if not RunRecord.is_finished(out):
        compress_run(dense, out, settings, compress_models(), seed=seed,
                     hardware=Hardware(accelerator="cpu", progress_bar=False), resume=out.exists())


def _unseen(run_dir: Path, data: Path) -> None:
    out = run_dir / f"eval-{data.name}"
    if RunRecord.is_finished(out):
        return
    run = RunRecord.open(run_dir)
    preset = get_preset(run.info["preset"])
    evaluate_run(run, rebuild_run_model(run, preset), out, crop=preset.crop, data_root=data,
                 num_slices=preset.num_slices, batch_size=preset.eval_batch_size)


def seed_dir(row: Path, seed: int) -> Path:
    """A table row's run of ``seed``: ``row/seed<s>`` (a table trained with several seeds) or the row itself."""
    return row / f"seed{seed}" if (row / f"seed{seed}").exists() else row


def _compare(a: Any, b: Any) -> dict[str, Any]:
    volumes = compare_rows(a, b, ("psnr",))["psnr"]
    seeds = paired_test([r["psnr_mean"] for r in a.runs], [r["psnr_mean"] for r in b.runs])
    return {"volumes": volumes.as_dict(), "seeds": seeds}


def _cell(c: dict[str, Any]) -> str:
    v, s = c["volumes"], c["seeds"]
    ci = f" [{v['t_ci'][0]:+.2f}, {v['t_ci'][1]:+.2f}]" if v.get("t_ci") else ""
    p = "—" if s["p"] is None else f"{s['p']:.3g}"
    return f"{v['mean_difference']:+.2f}{ci}, W p={v['wilcoxon_p']:.3g}, seeds p={p}"


def run(table: Path, out: Path, seeds: list[int], mode: str, jobs: int, unseen: Path | None,
        families: list[str] = list(FAMILIES)) -> dict[str, Any]:
    runs_root = table / "runs" / "4x"
    plan, rows = [], {}
    for family in families:
        name = FAMILIES[family]
        dense = [seed_dir(runs_root / name, s) for s in seeds]
        scratch = [seed_dir(runs_root / f"kron_{name}", s) for s in seeds]
        steps = int(RunRecord.read(scratch[0]).info["steps"])
        if mode == "matched":
            size = RunRecord.read(scratch[0]).info["params"] / RunRecord.read(dense[0]).info["params"]
            grid = matched_rows(steps, size)
        else:
            grid = {"study": study_rows, "choices": choice_rows, "cost": cost_rows}[mode](steps)
        rows[family] = {"dense": dense, "scratch": scratch, "compressed": {}}
        for label, settings in grid.items():
            dirs = [out / "runs" / family / slug(label) / f"seed{s}" for s in seeds]
            rows[family]["compressed"][label] = dirs
            plan += [((d, o, settings, s), {}) for d, o, s in zip(dense, dirs, seeds)]
    run_calls(_compress, plan, jobs)
    if unseen is not None:
        picked = [d for fam in rows.values()
                  for d in [*fam["dense"], *fam["scratch"], *unseen_rows(fam["compressed"])]]
        run_calls(_unseen, [((d, unseen), {}) for d in picked], jobs)
    result: dict[str, Any] = {"mode": mode, "seeds": seeds, "machine": machine_description(), "families": {}}
    for family, fam in rows.items():
        dense, scratch = row_over_seeds(fam["dense"], seeds), row_over_seeds(fam["scratch"], seeds)
        entry = {"dense": dense.as_dict(), "scratch": scratch.as_dict(), "rows": {}}
        for label, dirs in fam["compressed"].items():
            row = row_over_seeds(dirs, seeds)
            entry["rows"][label] = {**row.as_dict(), "params": row.first["params"], "steps": row.first["steps"],
                                    "vs_dense": _compare(row, dense), "vs_scratch": _compare(row, scratch),
                                    "compression": row.first["compression"],
                                    "convert_seconds": [r["compression"].get("convert_seconds") for r in row.runs],
                                    "train_seconds": [r["train_seconds"] for r in row.runs]}
        entry["scratch_vs_dense"] = _compare(scratch, dense)
        if unseen is not None:
            kinds = {"dense": fam["dense"], "scratch": fam["scratch"],
                     **{label: fam["compressed"].get(label, []) for label in UNSEEN_ROWS}}
            entry["unseen"] = {kind: [RunRecord.read(d / f"eval-{unseen.name}").mean("psnr") for d in dirs]
                               for kind, dirs in kinds.items() if dirs}
        result["families"][family] = entry
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# MRI compression {result['mode']} ({len(result['seeds'])} seeds, demo preset, 4x)", "",
             f"Machine: {result['machine']}", ""]
    for family, entry in result["families"].items():
        d, s = entry["dense"]["over_seeds"]["psnr"], entry["scratch"]["over_seeds"]["psnr"]
        lines += [f"## {family}", "",
                  f"Dense {d['mean']:.2f} ± {d['std']:.2f} dB; Kronecker from scratch {s['mean']:.2f} ± "
                  f"{s['std']:.2f} dB ({_cell(entry['scratch_vs_dense'])} vs dense).", "",
                  "| Row | Params | Steps | PSNR (dB, mean ± std over seeds) | SSIM | − dense (dB) [95 % t-CI over "
                  "volumes], Wilcoxon p, paired t over seeds p | − from scratch (dB) | Seconds: convert + distill |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, r in entry["rows"].items():
            p, q = r["over_seeds"]["psnr"], r["over_seeds"]["ssim"]
            lines.append(f"| {label} | {r['params']:,} | {r['steps']} | {p['mean']:.2f} ± {p['std']:.2f} | "
                         f"{fmt(q['mean'])} ± {fmt(q['std'])} | {_cell(r['vs_dense'])} | {_cell(r['vs_scratch'])} | "
                         f"{_seconds(r)} |")
        if "unseen" in entry:
            lines += ["", "Unseen anatomy (PSNR per seed, dB): " + "; ".join(
                f"{k} {' / '.join(f'{v:.2f}' for v in vals)}" for k, vals in entry["unseen"].items())]
        lines.append("")
    return "\n".join(lines)


def _seconds(row: dict[str, Any]) -> str:
    """Mean conversion and distillation seconds over the seeds (conversion: "?" for runs that predate its record)."""
    convert = [c for c in row["convert_seconds"] if c is not None]
    convert_mean = f"{sum(convert) / len(convert):.0f}" if len(convert) == len(row["convert_seconds"]) else "?"
    return f"{convert_mean} + {sum(row['train_seconds']) / len(row['train_seconds']):.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("study", "choices", "cost", "matched"))
    ap.add_argument("--table", type=Path, required=True, help="a table1 output folder with the dense and scratch runs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="default out/compress/mri-<mode>")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from " + ", ".join(FAMILIES))
    ap.add_argument("--unseen", type=Path, default=None, help="a demo-format folder of another anatomy")
    args = ap.parse_args(argv)
    out = args.out or Path(f"out/compress/mri-{args.mode}")
    result = run(args.table, out, list(range(args.seeds)), args.mode, args.jobs, args.unseen,
                 args.families.split(","))
    write_results(out, f"results-{args.mode}", json.loads(json.dumps(result, default=str)), markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
