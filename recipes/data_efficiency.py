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
import sys
import time
from pathlib import Path

from _common import add_arguments, data_of, default_out, resolve_jobs, resolve_preset, spec_of
from kronify.mri.errors import RecipeError
from kronify.mri.experiments.data_efficiency import Study, subset, write_outputs
from kronify.mri.experiments.evaluate import zero_filled_metrics
from kronify.mri.experiments.presets import FAMILIES
from kronify.mri.experiments.setup import check_variant
from kronify.mri.experiments.study import seed_list, seed_runs, train_pending
from kronify.mri.protocol import get_protocol
from zoo.build import build_run_model


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
        out = Path(args.out) if args.out else default_out(f"data_efficiency-{'-'.join(families)}", preset)
        data = data_of(args, preset, out / "split.json", args.acceleration)
        zf = zero_filled_metrics(data.datasets["test"], preset.eval_batch_size)
        fractions = sorted(set(args.fractions))
        specs = {}  # (family, fraction) -> {n: the row's spec}
        for family in families:
            for fraction in fractions:
                specs[family, fraction] = {n: spec_of(args, preset, family, n, "learned", args.acceleration, out)
                                           for n in (0, args.kron_n)}
                specs[family, fraction] = {n: s.at(out / "runs" / f"{fraction:g}" / s.name)
                                           for n, s in specs[family, fraction].items()}
        # seed by seed, so that a study stopped early holds complete seeds (rerun with --resume --seeds K)
        runs = []
        for i, seed in enumerate(seeds):
            for family in families:
                for fraction in fractions:
                    part = subset(data, fraction, seed, protocol.train_subset)
                    runs += [(seed_runs(spec, seeds)[i], part) for spec in specs[family, fraction].values()]
        if not train_pending(runs, preset, build_run_model, resolve_jobs(args, preset), zero_filled=zf):
            return 0  # a non-zero DDP rank: rank 0 writes the tables
        study = Study()
        for family in families:
            for fraction in fractions:
                train_set = subset(data, fraction, seeds[0], protocol.train_subset).datasets["train"]
                study.add_fraction(family, preset.model(family).zoo_name, fraction, train_set,
                                   specs[family, fraction], seeds)
        if not study.rows:
            return 0
        write_outputs(out, study, preset, families, args.kron_n, args.acceleration, args.max_steps, seeds, fractions,
                      data.is_demo, zf.summary(), start)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
