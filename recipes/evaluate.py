"""Evaluate a trained run's EMA weights on its test split or on any fastMRI-format folder.

    python recipes/evaluate.py --run out/unet-demo-4x                        # the run's own test split
    python recipes/evaluate.py --run RUN --data-path /data/knee_val --save-reconstructions
    python recipes/evaluate.py --run RUN --protocol paper                   # score a fastmri run the paper's way

RUN is a folder a recipe wrote (metrics.json, checkpoints/last.ckpt). The model is rebuilt from its metrics.json
(family, preset, Kronecker n and algebra; a run of recipes/compress.py from its kron/ save) and scored with the
run's crop, slices, acceleration and masks under
--protocol (default: the run's own; kronify.mri.protocol). Writes
metrics.json (the run's keys, the scores, a zero_filled block), per_volume.csv, per_slice.csv, reconstruction.png
and examples.npz to --out (default RUN/eval-test, or RUN/eval-<folder name> with --data-path); with
--save-reconstructions also OUT/reconstructions/<file>.h5 in fastMRI's submission layout. The orchestration is
kronify.mri.experiments.evaluate.evaluate_run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from kronify.mri.errors import DataError, RecipeError, RunError
from kronify.mri.experiments.evaluate import RECONSTRUCTIONS, evaluate_run
from kronify.mri.experiments.presets import get_preset
from kronify.mri.protocol import PROTOCOLS
from kronify.mri.experiments.run_folder import RunRecord
from zoo.build import rebuild_run_model


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a recipe's output folder")
    parser.add_argument("--data-path", default=None, metavar="ROOT",
                        help="fastMRI-format folder to evaluate on, all of its files (default: the run's test split)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                        help="how slices are undersampled, normalised and scored (default: the run's own)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval-test or RUN_DIR/eval-<ROOT>, "
                        "with -<protocol> appended when --protocol is given)")
    parser.add_argument("--save-reconstructions", action="store_true",
                        help="write OUT/reconstructions/<file>.h5 (fastMRI's submission layout)")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per batch (the run's preset default)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    return parser, parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """``--device``: auto = the first GPU when there is one, else the CPU; a GPU that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise RecipeError(f"--device {name!r} is not a device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device {name!r}: no GPU is available here; use --device cpu")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise RecipeError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        run = RunRecord.open(args.run)
        info = run.info
        try:
            preset = get_preset(info["preset"])
        except ValueError as err:
            raise RunError(f"{run.path / 'metrics.json'}: {err}") from err
        model = rebuild_run_model(run, preset)
        if args.out is None:
            tag = "test" if args.data_path is None else Path(args.data_path).expanduser().resolve().name
            out = run.path / (f"eval-{tag}" + (f"-{args.protocol}" if args.protocol else ""))
        else:
            out = Path(args.out)
        batch_size = args.batch_size if args.batch_size is not None else preset.eval_batch_size
        result = evaluate_run(run, model, out, crop=preset.crop, protocol=args.protocol, data_root=args.data_path,
                              num_slices=preset.num_slices, save_reconstructions=args.save_reconstructions,
                              batch_size=batch_size, num_workers=preset.num_workers, device=device)
    except (RunError, DataError, RecipeError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    zf = result["zero_filled"]
    print(f"{result['model']} {result['acceleration']}x, {result['protocol']} protocol, on {result['eval_set']} of "
          f"{result['eval_data']} ({result['n_volumes']} volumes, {result['n_slices']} slices): "
          f"SSIM {result['ssim_mean']:.4f} (zero-filled {zf['ssim_mean']:.4f}), PSNR {result['psnr_mean']:.2f} dB (zero-filled "
          f"{zf['psnr_mean']:.2f}) -> {out / 'metrics.json'}"
          + (f"; reconstructions in {out / RECONSTRUCTIONS}" if args.save_reconstructions else ""), flush=True)
    for metric, unit in (("psnr", " dB"), ("ssim", "")):
        c = result["vs_zero_filled"][metric]
        ci = f"95 % t-CI {c['t_ci'][0]:+.3f} to {c['t_ci'][1]:+.3f}, " if c["t_ci"] else ""
        print(f"  {metric.upper()} minus zero-filled over {c['n']} volumes: {c['mean_difference']:+.3f}{unit} "
              f"({ci}Wilcoxon p = {c['wilcoxon_p']:.3g}): {c['verdict']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
