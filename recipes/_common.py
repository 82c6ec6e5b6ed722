"""The command line shared by every recipe: train a zoo model (dense and/or Kronecker) and evaluate it.

``python recipes/unet_fastmri.py [--data-path ROOT] [--preset paper|demo|tiny] [--kron-n N ...] ...``

- With ``--data-path`` the fastMRI single-coil files under ROOT are used (``singlecoil_train/`` and
  ``singlecoil_val/``, pooled and split by volume; the split is written to OUT/split.json and reused), and the
  default preset is ``paper``.
- Without it, the embedded demo dataset is built once into the cache folder ($KRONIFY_CACHE, default
  ~/.cache/kronify) and the default preset is ``demo`` (CPU, minutes).
- ``--protocol paper|fastmri`` (default: the preset's; ``paper`` for the paper preset, ``fastmri`` for demo and
  tiny) decides how slices are undersampled, normalised and scored (kronify.mri.protocol); masks are set with
  ``--mask-type``, ``--center-fraction``, ``--acceleration`` and ``--fixed-mask`` (one mask for training and
  testing, saved as OUT/mask_*.npy; the default under the paper protocol).

Each variant (``--kron-n 0`` dense, ``--kron-n 2`` Kronecker, both with ``--kron-n 0 2``) is trained, then
evaluated on the test split with its EMA weights: OUT/metrics.json, per_volume.csv, per_slice.csv,
reconstruction.png, history.json, examples.npz, logs/ (CSV + TensorBoard) and checkpoints/last.ckpt.
Several variants go to OUT/<variant>/. ``--resume`` continues from OUT/checkpoints/last.ckpt.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kronify.mri.data.masks import MASK_TYPES
from kronify.mri.errors import RecipeError
from kronify.mri.experiments.evaluate import zero_filled_metrics
from kronify.mri.experiments.jobs import default_jobs
from kronify.mri.experiments.presets import PRESETS, Preset, get_preset
from kronify.mri.experiments.run import Hardware, RunSpec, train_runs
from kronify.mri.experiments.setup import Data, MaskSettings, check_variant, is_global_zero, prepare_data
from kronify.mri.protocol import PROTOCOLS
from kronify.mri.training.trainer import PRECISIONS
from zoo import variant_name
from zoo.build import build_run_model

ACCELERATIONS = (4, 8, 16)
ALGEBRAS = ("learned", "complex")


def add_arguments(parser: argparse.ArgumentParser, *, variants: bool = True) -> None:
    """The flags every recipe shares."""
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", default=None, metavar="ROOT",
                      help="fastMRI single-coil root (singlecoil_train/, singlecoil_val/); omit for the demo data")
    data.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="paper (default with --data-path), demo (default without), tiny (tests)")
    data.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                      help="paper (the official code: fixed mask over the crop, per-slice metrics) or fastmri "
                           "(fastMRI's transforms, per-volume metrics); default: the preset's")
    data.add_argument("--acceleration", type=int, choices=ACCELERATIONS, default=None,
                      help="undersampling (default: the preset's first acceleration: 8 for paper, 4 for demo/tiny)")
    data.add_argument("--mask-type", choices=MASK_TYPES, default="random", help="fastMRI mask function")
    data.add_argument("--center-fraction", type=float, default=None,
                      help="fully sampled centre fraction (default: 0.08 at 4x, 0.04 at 8x, 0.02 at 16x)")
    data.add_argument("--fixed-mask", action=argparse.BooleanOptionalAction, default=None,
                      help="one mask for training and testing, saved with the run (default: on under the paper "
                           "protocol, off under fastmri: random training masks, per-file test masks)")
    data.add_argument("--limit-cases", type=int, default=None, metavar="N",
                      help="use at most N volumes of each split (quick runs)")
    data.add_argument("--cache-dir", default=None, help="demo data cache (default $KRONIFY_CACHE or ~/.cache/kronify)")
    data.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (preset default)")
    if variants:
        model = parser.add_argument_group("model")
        model.add_argument("--kron-n", type=int, nargs="+", default=[0], metavar="N",
                           help="0 = the dense model, N >= 2 = its Kronecker version with n = N; several train each")
        model.add_argument("--algebra", choices=ALGEBRAS, default="learned",
                           help="Kronecker algebra: learned A matrices, or the fixed complex rule (n = 2)")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=None, help="optimizer steps (preset default per model)")
    train.add_argument("--batch-size", type=int, default=None, help="global batch size (split over processes)")
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate (preset default)")
    train.add_argument("--gamma", type=float, default=None,
                       help="perceptual (VGG19) loss weight; > 0 needs the VGG19 weights on disk")
    train.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    train.add_argument("--val-every", type=int, default=None, help="validate every N steps")
    train.add_argument("--ckpt-every", type=int, default=None, help="write checkpoints/last.ckpt every N steps")
    train.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and masks")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    hw = add_hardware_arguments(parser)
    hw.add_argument("--jobs", type=int, default=None, metavar="N",
                    help="train N runs at a time, each in its own process with its share of the torch threads "
                         "(default: the preset's, 2 for demo, capped at the torch threads; 1 with DDP)")
    parser.add_argument("--out", default=None, help="output folder (default: a folder under out/ named after the recipe "
                        "or model, the preset, the protocol when it is not the preset's, and, for single-model "
                        "recipes, the acceleration)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_hardware_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The hardware flags (accelerator, devices, nodes, strategy, precision): Lightning's Trainer settings."""
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    hw.add_argument("--devices", default="1", help="devices per node (an int, or 'auto')")
    hw.add_argument("--num-nodes", type=int, default=1, help="number of nodes (DDP)")
    hw.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp, ddp_spawn")
    hw.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="auto = bf16/16-mixed on GPUs, 32-true on CPU (preset default)")
    return hw


def hardware_of(args: argparse.Namespace) -> Hardware:
    """The run's :class:`Hardware` from the hardware flags, ``--grad-clip`` and ``--no-progress``."""
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    return Hardware(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=args.strategy,
                    grad_clip=args.grad_clip, progress_bar=not args.no_progress)


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The preset named by ``--preset`` (default by data source) with the command line's overrides."""
    name = args.preset or ("paper" if args.data_path else "demo")
    for flag in ("max_steps", "batch_size", "val_every", "ckpt_every", "limit_cases", "num_workers"):
        value = getattr(args, flag, None)
        if value is not None and value < (0 if flag == "num_workers" else 1):
            raise RecipeError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'num_workers' else 1}, "
                              f"got {value}")
    if args.lr is not None and args.lr <= 0:
        raise RecipeError(f"--lr must be > 0, got {args.lr}")
    if args.gamma is not None and args.gamma < 0:
        raise RecipeError(f"--gamma must be >= 0, got {args.gamma}")
    center = getattr(args, "center_fraction", None)
    if center is not None and not 0 < center < 1:
        raise RecipeError(f"--center-fraction must lie in (0, 1), got {center}")
    return get_preset(name, batch_size=args.batch_size, lr=args.lr, gamma=args.gamma, val_every=args.val_every,
                      ckpt_every=args.ckpt_every, num_workers=args.num_workers, precision=args.precision,
                      protocol=getattr(args, "protocol", None))


def resolve_jobs(args: argparse.Namespace, preset: Preset) -> int:
    """How many runs train at a time (``--jobs``, else the preset's, capped by kronify.mri.experiments.jobs.default_jobs);
    always 1 for multi-process (DDP) training, which is itself several processes per run."""
    distributed = str(args.devices) not in ("1", "auto") or args.num_nodes != 1 or args.strategy != "auto"
    if args.jobs is None:
        return 1 if distributed else default_jobs(preset.jobs)
    if args.jobs < 1:
        raise RecipeError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and distributed:
        raise RecipeError("--jobs > 1 trains single-process runs side by side; it cannot be combined with "
                          "--devices, --num-nodes or --strategy (DDP)")
    return args.jobs


def default_out(stem: str, preset: Preset, suffix: str = "") -> Path:
    """``out/<stem>-<preset>[-<protocol>]<suffix>``: the protocol is named when it is not the preset's own."""
    protocol = "" if preset.protocol == PRESETS[preset.name].protocol else f"-{preset.protocol}"
    return Path(f"out/{stem}-{preset.name}{protocol}{suffix}")


def masks_of(args: argparse.Namespace, preset: Preset) -> MaskSettings:
    """The run's mask settings from ``--mask-type``, ``--center-fraction`` and ``--fixed-mask``."""
    return MaskSettings.of(preset, getattr(args, "mask_type", "random"), getattr(args, "center_fraction", None),
                           getattr(args, "fixed_mask", None))


def data_of(args: argparse.Namespace, preset: Preset, split_file: Path, acceleration: int) -> Data:
    """The run's data (kronify.mri.experiments.setup.prepare_data) from ``--data-path``, ``--cache-dir`` and
    ``--limit-cases``."""
    return prepare_data(preset, split_file, acceleration, masks_of(args, preset), data_path=args.data_path,
                        cache=args.cache_dir, limit_cases=args.limit_cases)


def spec_of(args: argparse.Namespace, preset: Preset, family: str, kron_n: int, algebra: str, acceleration: int,
            out_dir: Path) -> RunSpec:
    """The RunSpec of one variant from the command line (its seed ``--seed``; a study sets each seed's)."""
    return RunSpec(family, kron_n, algebra, variant_name(preset.model(family).zoo_name, kron_n, algebra),
                   acceleration, masks_of(args, preset), Path(out_dir), seed=args.seed, max_steps=args.max_steps,
                   resume=args.resume, hardware=hardware_of(args))


def run_recipe(family: str, argv: Sequence[str] | None = None, description: str = "") -> int:
    """Entry point of ``recipes/<family>_fastmri.py``."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        preset = resolve_preset(args)
        variants = list(dict.fromkeys(args.kron_n))
        for n in variants:
            check_variant(family, preset, n, args.algebra)
        if args.acceleration is None:
            args.acceleration = preset.accelerations[0]
        out = Path(args.out) if args.out else default_out(family, preset, f"-{args.acceleration}x")
        data = data_of(args, preset, out / "split.json", args.acceleration)
        zero_filled = zero_filled_metrics(data.datasets["test"], preset.eval_batch_size) if is_global_zero() else None
        start = time.perf_counter()
        specs = [spec_of(args, preset, family, n, args.algebra, args.acceleration, out) for n in variants]
        if len(specs) > 1:
            specs = [spec.at(out / spec.name) for spec in specs]
        train_runs([(spec, data) for spec in specs], preset, build_run_model, resolve_jobs(args, preset),
                   zero_filled=zero_filled)
        if is_global_zero() and len(variants) > 1:
            print(f"trained {len(variants)} variants in {time.perf_counter() - start:.0f} s under {out}")
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit("run one of the recipes (e.g. recipes/unet_fastmri.py), not this shared module")
