"""Compress a trained dense run into a Kronecker run that matches it: calibrated warm start, then distillation.

    python recipes/compress.py --run out/unet-demo-4x --out out/unet-demo-4x-compressed          # n = 2
    python recipes/compress.py --run RUN --out OUT --budget 0.5        # half the parameters, terms where needed
    python recipes/compress.py --run RUN --out OUT --steps 0           # the warm start alone, tested

RUN is a finished dense run of any family (a recipe's or table1's run folder). Its Kronecker copy is warm-started
from its EMA weights (calibrated on training slices; ``--warm-start weights``: the nearest Kronecker sum), then
trained to follow it for ``--steps`` (default: ``--fraction`` 0.2 of the dense run's) under the run's own
preset, protocol, masks and split, and tested. OUT is a normal run folder (``recipes/evaluate.py``, tables and the
seeds tooling read it) plus OUT/kron/ (``kronify.save``); metrics.json records the teacher and the compression
settings. The orchestration is kronify.mri.experiments.compress.compress_run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kronify.mri.errors import DataError, RecipeError, RunError
from kronify.mri.experiments.compress import TARGETS, CompressSettings, compress_run
from kronify.mri.experiments.presets import PRESETS
from kronify.mri.protocol import PROTOCOLS
from _common import add_hardware_arguments, hardware_of
from zoo.build import compress_models

DEFAULTS = CompressSettings()


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, metavar="DENSE_RUN", help="a finished dense run folder")
    parser.add_argument("--out", required=True, help="the compressed run's folder (must not hold a run)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--kron-n", type=int, default=DEFAULTS.kron_n, help="Kronecker n of every converted layer")
    size.add_argument("--budget", type=float, default=None,
                      help="keep this fraction of the parameters (0-1), more terms where the layers need them")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="distillation steps (0: the warm start alone, tested)")
    length.add_argument("--fraction", type=float, default=DEFAULTS.fraction,
                        help="distillation steps as a fraction of the dense run's (when --steps is not given)")
    parser.add_argument("--warm-start", choices=("calibrated", "weights"), default=DEFAULTS.warm_start,
                        help="fit the factors to the layers' inputs on training slices, or to the weights alone")
    parser.add_argument("--calibration-batches", type=int, default=DEFAULTS.calibration_batches,
                        help="training batches the calibrated warm start reads")
    parser.add_argument("--target", choices=sorted(TARGETS), default=DEFAULTS.target,
                        help="what the student learns from: the teacher's output, the ground truth, or both")
    parser.add_argument("--features", type=float, default=DEFAULTS.features,
                        help="weight of matching every converted layer's output to the teacher's (0: off)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration batches and data order")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="check the run was trained under this preset (default: the run's own)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                        help="check the run was trained under this protocol (default: the run's own)")
    parser.add_argument("--cache-dir", default=None, help="demo data cache (default $KRONIFY_CACHE or ~/.cache/kronify)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    add_hardware_arguments(parser)
    parser.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = parse_args(argv)
    settings = CompressSettings(kron_n=args.kron_n, budget=args.budget, warm_start=args.warm_start,
                                calibration_batches=args.calibration_batches, steps=args.steps, fraction=args.fraction,
                                target=args.target, features=args.features, lr=args.lr)
    try:
        result = compress_run(args.run, args.out, settings, compress_models(), seed=args.seed,
                              hardware=hardware_of(args), resume=args.resume, preset_name=args.preset,
                              protocol=args.protocol, precision=args.precision, cache=args.cache_dir)
    except (RecipeError, RunError, DataError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if result:
        c = result["compression"]
        print(f"{result['model']}: {result['params']:,} parameters ({result['params'] / c['teacher_params']:.0%} of the teacher's), "
              f"{result['steps']} steps: test PSNR {result['psnr_mean']:.2f} dB (teacher {c['teacher_psnr']:.2f}), "
              f"SSIM {result['ssim_mean']:.4f} (teacher {c['teacher_ssim']:.4f}) -> {args.out}/metrics.json",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
