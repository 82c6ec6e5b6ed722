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
import copy
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

import kronify
import zoo
from kronify.mri.training.checkpoint import last_checkpoint
from kronify.mri.data.datasets import SplitDataset, build_datasets
from kronify.mri.data.volumes import SPLITS
from kronify.mri.errors import DataError
from kronify.mri.experiments.evaluate import zero_filled_metrics
from kronify.mri.experiments.jobs import default_jobs, run_calls
from kronify.mri.data.masks import MASK_TYPES
from kronify.mri.experiments.presets import FAMILIES, PRESETS, Preset, get_preset
from kronify.mri.protocol import PROTOCOLS, get_protocol
from kronify.mri.errors import RunFolderError
from kronify.mri.experiments.run import Hardware, train_and_test
from kronify.mri.training.trainer import PRECISIONS
from kronify.mri.training.wrappers import ZeroFilledStart
from zoo.summary import count_flops, count_params

ACCELERATIONS = (4, 8, 16)
ALGEBRAS = ("learned", "complex")


class RecipeError(Exception):
    """A user-facing problem (bad flag combination, data that does not fit the preset); printed, exit code 2."""


def cache_dir(explicit: str | None = None) -> Path:
    """Where the demo dataset is built: ``--cache-dir``, else $KRONIFY_CACHE, else ~/.cache/kronify."""
    return Path(explicit or os.environ.get("KRONIFY_CACHE") or Path.home() / ".cache" / "kronify").expanduser()


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
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    hw.add_argument("--devices", default="1", help="devices per node (an int, or 'auto')")
    hw.add_argument("--num-nodes", type=int, default=1, help="number of nodes (DDP)")
    hw.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp, ddp_spawn")
    hw.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="auto = bf16/16-mixed on GPUs, 32-true on CPU (preset default)")
    hw.add_argument("--jobs", type=int, default=None, metavar="N",
                    help="train N runs at a time, each in its own process with its share of the torch threads "
                         "(default: the preset's, 2 for demo, capped at the torch threads; 1 with DDP)")
    parser.add_argument("--out", default=None, help="output folder (default: a folder under out/ named after the recipe "
                        "or model, the preset, the protocol when it is not the preset's, and, for single-model "
                        "recipes, the acceleration)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Data:
    """The datasets of one run (train/val/test) and where they came from."""

    root: Path
    datasets: dict[str, SplitDataset]
    is_demo: bool


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


def train_calls(args: argparse.Namespace, jobs: int, calls: list[tuple[tuple, dict]]) -> list[dict[str, Any]]:
    """Run :func:`train_and_evaluate` calls ``jobs`` at a time (kronify.mri.experiments.jobs.run_calls); side-by-side runs
    show no progress bars, whose lines would interleave."""
    if jobs > 1 and not args.no_progress:
        calls = [((argparse.Namespace(**{**vars(a[0]), "no_progress": True}), *a[1:]), k) for a, k in calls]
    return run_calls(train_and_evaluate, calls, jobs)


def default_out(stem: str, preset: Preset, suffix: str = "") -> Path:
    """``out/<stem>-<preset>[-<protocol>]<suffix>``: the protocol is named when it is not the preset's own."""
    protocol = "" if preset.protocol == PRESETS[preset.name].protocol else f"-{preset.protocol}"
    return Path(f"out/{stem}-{preset.name}{protocol}{suffix}")


def mask_settings(args: argparse.Namespace, preset: Preset) -> dict[str, Any]:
    """The run's mask settings (protocol, type, centre fraction, fixed or not), as recorded in metrics.json."""
    protocol = get_protocol(preset.protocol)
    fixed = getattr(args, "fixed_mask", None)
    return {"protocol": protocol.name, "mask_type": getattr(args, "mask_type", "random"),
            "center_fraction": getattr(args, "center_fraction", None),
            "fixed_mask": protocol.fixed_mask if fixed is None else bool(fixed)}


def prepare_data(args: argparse.Namespace, preset: Preset, split_file: Path, acceleration: int) -> Data:
    """Build (or reuse) the data and the split; check that the preset fits it."""
    if args.data_path is not None:
        root = Path(args.data_path).expanduser()
        if not root.is_dir():
            raise RecipeError(f"--data-path {str(root)!r} does not exist or is not a folder")
        is_demo = False
    else:
        if preset.demo_build is None:
            raise RecipeError(f"preset {preset.name!r} is for real fastMRI data: pass --data-path ROOT "
                              "(or use --preset demo)")
        from kronify.mri.data.demo import NOTICE, build_demo_dataset

        build = preset.demo_build
        tag = "-".join(f"{k}{'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
                       for k, v in sorted(build.items()))
        root = cache_dir(args.cache_dir) / f"demo-{tag}"
        result = build_demo_dataset(root, **build)
        if not result.reused and _is_global_zero():
            print(f"built the demo dataset in {root} ({result.seconds:.0f} s). {NOTICE}", flush=True)
        is_demo = True
    masks = mask_settings(args, preset)
    try:
        datasets = build_datasets(root, split_file, crop=preset.crop, accelerations=acceleration,
                                  num_slices=preset.num_slices, protocol=masks["protocol"],
                                  mask_type=masks["mask_type"], center_fractions=masks["center_fraction"],
                                  fixed_mask=masks["fixed_mask"], mask_file=split_file.parent)
    except DataError as err:
        if "larger than the image" in str(err):
            raise RecipeError(f"preset {preset.name!r} crops {preset.crop}x{preset.crop} but the data does not fit: "
                              f"{err}. Use a preset with a smaller crop (e.g. --preset demo).") from err
        raise RecipeError(str(err)) from err
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(str(err)) from err
    if args.limit_cases is not None:
        datasets = {name: ds.with_transform(ds.transform, ds.files[: args.limit_cases])
                    for name, ds in datasets.items()}
    for name in SPLITS:
        if len(datasets[name]) == 0:
            raise RecipeError(f"the {name} split under {root} has no slices (split file {split_file}); "
                              "the data has too few volumes for this split")
    return Data(root, datasets, is_demo)


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def variant_name(zoo_name: str, kron_n: int, algebra: str) -> str:
    """``unet_demo`` (dense), ``kron_unet_demo`` (n = 2), ``kron_unet_demo_n4``, ``kron_unet_demo_complex``."""
    if kron_n == 0:
        return zoo_name
    suffix = "" if kron_n == 2 else f"_n{kron_n}"
    return f"kron_{zoo_name}{suffix}" + ("_complex" if algebra == "complex" else "")


def build_model(family: str, preset: Preset, kron_n: int, algebra: str) -> torch.nn.Module:
    """The preset's zoo model for ``family``, converted with ``kronify.convert`` when ``kron_n`` >= 2."""
    check_variant(family, preset, kron_n, algebra)
    spec = preset.model(family)
    if kron_n == 0:
        model = zoo.create(spec.zoo_name, **spec.overrides)
    else:
        model, _ = zoo.create_kron(spec.zoo_name, n=kron_n, algebra=algebra, **spec.overrides)
    return ZeroFilledStart(model, correction=spec.correction, gain_init=spec.start_gain) \
        if preset.zero_filled_start else model


def model_cost(model: torch.nn.Module, size: int) -> tuple[int, float]:
    """(parameters, GFLOPs of one 2×size×size slice); a Kronecker model is counted after ``kronify.merge``."""
    params = count_params(model)
    network = model.model if isinstance(model, ZeroFilledStart) else model
    return params, count_flops(kronify.merge(copy.deepcopy(network)), size) / 1e9


def train_and_evaluate(
    args: argparse.Namespace,
    preset: Preset,
    data: Data,
    family: str,
    kron_n: int,
    algebra: str,
    acceleration: int,
    out_dir: Path,
    *,
    zero_filled=None,
) -> dict[str, Any]:
    """Build one variant (seeded by ``--seed``) and train, test and write it with kronify.mri.experiments.run.train_and_test
    (resuming when asked); returns its metrics.json content."""
    name = variant_name(preset.model(family).zoo_name, kron_n, algebra)
    if args.resume and last_checkpoint(out_dir / "checkpoints") is None and _is_global_zero():
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}, starting {name} from scratch", flush=True)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = build_model(family, preset, kron_n, algebra)
    params, gflops = model_cost(model, preset.crop)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    hardware = Hardware(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
                        strategy=args.strategy, grad_clip=args.grad_clip, progress_bar=not args.no_progress)
    info = {"model": name, "kron_n": kron_n, "algebra": algebra if kron_n else None, "acceleration": acceleration,
            "params": params, "gflops": gflops, "gflops_size": preset.crop,
            "data": "demo" if data.is_demo else str(data.root), "data_root": str(data.root.resolve()),
            **mask_settings(args, preset)}
    try:
        result = train_and_test(model, preset, data.datasets, out_dir, family=family, seed=args.seed,
                                max_steps=args.max_steps, resume=args.resume, hardware=hardware,
                                zero_filled=zero_filled, info=info)
    except RunFolderError as err:
        raise RecipeError(str(err)) from err
    if result:
        zf = result["zero_filled"]
        print(f"{name} {acceleration}x ({result['protocol']} protocol): test SSIM {result['ssim_mean']:.4f} "
              f"(zero-filled {zf['ssim_mean']:.4f}), PSNR {result['psnr_mean']:.2f} dB (zero-filled "
              f"{zf['psnr_mean']:.2f}), {result['steps']} steps in {result['train_seconds']:.0f} s -> "
              f"{out_dir / 'metrics.json'}", flush=True)
    return result


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
        data = prepare_data(args, preset, out / "split.json", args.acceleration)
        zero_filled = zero_filled_metrics(data.datasets["test"], preset.eval_batch_size) if _is_global_zero() else None
        start = time.perf_counter()
        run_outs = [out if len(variants) == 1 else out / variant_name(preset.model(family).zoo_name, n, args.algebra)
                    for n in variants]
        train_calls(args, resolve_jobs(args, preset),
                    [((args, preset, data, family, n, args.algebra, args.acceleration, run_out),
                      {"zero_filled": zero_filled}) for n, run_out in zip(variants, run_outs)])
        if _is_global_zero() and len(variants) > 1:
            print(f"trained {len(variants)} variants in {time.perf_counter() - start:.0f} s under {out}")
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def check_variant(family: str, preset: Preset, kron_n: int, algebra: str) -> None:
    """Validate a variant's flags before any data is built."""
    if family not in FAMILIES or family not in preset.models:
        raise RecipeError(f"preset {preset.name!r} has no model family {family!r}; it has {sorted(preset.models)}")
    if kron_n < 0 or kron_n == 1:
        raise RecipeError(f"--kron-n must be 0 (dense) or >= 2, got {kron_n}")
    if algebra == "complex" and kron_n not in (0, 2):
        raise RecipeError(f"--algebra complex is the n = 2 algebra; got --kron-n {kron_n}")


if __name__ == "__main__":
    sys.exit("run one of the recipes (e.g. recipes/unet_fastmri.py), not this shared module")
