"""Reproduce the paper's Table 1: zero-filling, LB U-Net, Efficient U-Net, the paper's U-Net and Kronecker U-Net
(DDPM-style, zoo `unet_ddpm`), fastMRI's U-Net and its Kronecker versions (learned and fixed complex algebra),
SwinMR, Kronecker SwinMR, MoDL and Kronecker MoDL, trained and tested on the same split under one protocol.

    python recipes/table1.py --preset demo                  # `make demo`: demo data, 2 CPU cores, 4x, fastmri protocol
    python recipes/table1.py --data-path /data/fastmri      # the paper preset and protocol at 8x and 4x (GPU)
    python recipes/table1.py --tiny --protocol paper --out /tmp/t1   # every row in seconds (tests)
    python recipes/table1.py --preset demo --models unet,swinmr,modl --seeds 3   # the seeds study

A preset may run fewer rows by default (``Preset.table_rows``: the demo leaves out the DDPM U-Net and the
complex-algebra row, which do not fit its time budget; ``--models unet_ddpm`` runs them). The compressed rows
(kronify.mri.experiments.table1.COMPRESSED: the trained dense U-Net and MoDL compressed by recipes/compress.py
--budget 0.5) start as soon as their dense run has trained; those dense rows train first, then the others, longest
first. Rows are runs: ``--jobs N`` (the demo's default: 2) runs N at a time, each in its own process
(kronify.mri.experiments.jobs).

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
import sys
import time
from dataclasses import replace
from pathlib import Path

from _common import add_arguments, data_of, default_out, resolve_jobs, resolve_preset, spec_of
from kronify.mri.errors import RecipeError
from kronify.mri.experiments.evaluate import zero_filled_metrics
from kronify.mri.experiments.compress import compress_tasks
from kronify.mri.experiments.jobs import run_tasks
from kronify.mri.experiments.presets import Preset
from kronify.mri.experiments.run import RunSpec
from kronify.mri.experiments.study import pending_training, seed_list, seed_runs
from kronify.mri.experiments.table1 import COMPRESSED, COMPRESSED_SETTINGS, ROWS, Table1, select_rows, write_table
from zoo.build import build_run_model, compress_models

__all__ = ["ROWS", "main", "select_rows"]


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
        out = Path(args.out) if args.out else default_out("table1", preset)
        accelerations = args.accelerations or list(preset.accelerations)
        table = Table1(preset, rows, seeds, out)
        models = compress_models()
        phases: dict[str, float] = {}  # where the wall time went (table1.md's "Wall time" line)
        reconciliation = reconciliation_note(preset)  # before training: a failure here costs no training time
        tick = _lap(phases, "Table 1 counts of the official configurations", start)
        for acc in accelerations:
            data = data_of(args, preset, out / "split.json", acc)
            zero_filled = zero_filled_metrics(data.datasets["test"], preset.eval_batch_size)
            specs = {label: spec_of(args, preset, family, kron_n, algebra, acc, out / "runs" / f"{acc}x")
                     for label, family, kron_n, algebra in rows[1:]}
            specs = {label: replace(spec, name=models.name(spec.family, preset, COMPRESSED_SETTINGS))
                     if label in COMPRESSED else spec for label, spec in specs.items()}
            specs = {label: spec.at(spec.out_dir / spec.name) for label, spec in specs.items()}
            tick = _lap(phases, "data and zero-filled scores", tick)
            runs = [(run, data) for label in sorted(specs, key=lambda label: _start_order(label, specs[label], preset))
                    if label not in COMPRESSED for run in seed_runs(specs[label], seeds)]
            training = pending_training(runs, preset, build_run_model, jobs, zero_filled=zero_filled)
            pairs = [(specs[COMPRESSED[label]], spec) for label, spec in specs.items() if label in COMPRESSED]
            compressing = compress_tasks(pairs, seeds, models, jobs, COMPRESSED_SETTINGS, cache=args.cache_dir,
                                         after=training)
            if not all(run_tasks([*training.values(), *compressing], jobs)[:len(training)]):
                continue  # a non-zero rank in DDP: rank 0 writes the table
            tick = _lap(phases, f"training, compressing and testing the runs ({jobs} at a time)", tick)
            table.add_acceleration(acc, data, specs, zero_filled)
        if not table.lines:
            return 0
        _lap(phases, "comparisons, figures and tables", tick)
        write_table(out, preset, table.lines, table.csv_rows, table.json_rows, accelerations, table.notes,
                    data.is_demo, time.perf_counter() - start, argv, reconciliation, seeds=seeds,
                    sections=table.sections, jobs=jobs, phases=phases)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def _start_order(label: str, spec: RunSpec, preset: Preset) -> tuple[bool, int]:
    """Which rows start first: the dense rows that compressed rows wait on, then the longest (most steps) first,
    so that no long run starts last while the other workers sit idle."""
    return label not in COMPRESSED.values(), -(spec.max_steps or preset.steps_for(spec.family))


def _lap(phases: dict[str, float], name: str, since: float) -> float:
    """Add the time since ``since`` to ``phases[name]``; returns now."""
    now = time.perf_counter()
    phases[name] = phases.get(name, 0.0) + now - since
    return now


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


if __name__ == "__main__":
    sys.exit(main())
