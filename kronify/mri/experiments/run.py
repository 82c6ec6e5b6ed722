"""One run: train a reconstruction model under a preset, test its EMA weights and write its run folder.

- :func:`train_and_test` trains any model that maps a zero-filled image to an image (or, with ``needs_kspace``,
  also takes k-space and mask, as MoDL does): Lightning training with the preset's loss, learning-rate schedule,
  EMA, augmentation and training patches, then the test split scored with the EMA weights and written by
  :func:`kronify.mri.experiments.run_folder.write_run` (metrics.json with the paired comparison against
  zero-filling, CSVs, figure, examples, validation history, checkpoints and logs)::

      result = train_and_test(model, get_preset("demo"), datasets, "out/my_model", seed=0)

- A :class:`RunSpec` (frozen: family, Kronecker n, algebra, name, acceleration, masks, seed, folder, hardware) is
  what the recipes send to worker processes; :func:`train_run` builds its model with a model factory (the
  recipes pass ``zoo.build.build_run_model``; kronify.mri never imports zoo) and runs :func:`train_and_test`;
  :func:`train_runs` runs several, ``jobs`` at a time (:mod:`kronify.mri.experiments.jobs`; :func:`train_tasks`
  gives them as tasks, for a caller that adds follow-up work).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import nn

from kronify.mri.errors import RecipeError, RunFolderError
from kronify.mri.experiments.evaluate import example_indices, reconstruct_examples, zero_filled_metrics
from kronify.mri.experiments.jobs import Task, run_tasks
from kronify.mri.experiments.presets import Preset
from kronify.mri.experiments.run_folder import write_run
from kronify.mri.experiments.setup import Data, MaskSettings, is_global_zero
from kronify.mri.losses import CompositeLoss
from kronify.mri.metrics import MetricsAccumulator
from kronify.mri.protocol import get_protocol
from kronify.mri.training.checkpoint import LAST, last_checkpoint
from kronify.mri.training.distill import DistillReconModule, DistillWeights
from kronify.mri.training.data_module import ReconDataModule
from kronify.mri.training.module import ReconModule
from kronify.mri.training.trainer import make_trainer

__all__ = ["Hardware", "ModelFactory", "RunSpec", "side_by_side", "train_and_test", "train_run", "train_runs",
           "train_tasks"]


@dataclass(frozen=True)
class Hardware:
    """Where and how Lightning trains: accelerator, devices and nodes (DDP), strategy, gradient clipping and
    whether a progress bar is shown."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    grad_clip: float | None = None
    progress_bar: bool = True


@dataclass(frozen=True)
class RunSpec:
    """One run to train and test: the preset's model ``family`` (``kron_n`` 0: dense, >= 2: Kronecker with that
    n and ``algebra``), named ``name`` (``zoo.variant_name``), at ``acceleration`` with ``masks``, seeded by
    ``seed`` (model init, data order, masks), written into ``out_dir``; ``max_steps`` None: the preset's;
    ``resume`` continues from the folder's last checkpoint."""

    family: str
    kron_n: int
    algebra: str
    name: str
    acceleration: int
    masks: MaskSettings
    out_dir: Path
    seed: int = 0
    max_steps: int | None = None
    resume: bool = False
    hardware: Hardware = Hardware()

    def at(self, out_dir: str | os.PathLike, seed: int | None = None) -> RunSpec:
        """The same run in another folder (and with another seed)."""
        return replace(self, out_dir=Path(out_dir), seed=self.seed if seed is None else seed)


#: Builds the model of a run: ``(spec, preset) -> (model, its cost for metrics.json: params, gflops, gflops_size)``.
ModelFactory = Callable[[RunSpec, Preset], tuple[nn.Module, Mapping[str, Any]]]


def train_and_test(
    model: nn.Module,
    preset: Preset,
    datasets: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    family: str | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    resume: bool = False,
    hardware: Hardware = Hardware(),
    zero_filled: MetricsAccumulator | None = None,
    info: Mapping[str, Any] | None = None,
    teacher: nn.Module | None = None,
    distill: DistillWeights | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``datasets["train"]`` (validating on ``"val"``), test its EMA weights on ``"test"`` and
    write the run into ``out_dir``; returns the metrics.json content ({} on a non-zero DDP rank, once rank 0 has
    written the run, so that work after it on any rank can read it).

    ``family`` picks the preset's step count and training patches (its :class:`~kronify.mri.experiments.presets.ModelSpec`);
    ``max_steps`` overrides the steps. ``resume`` continues from ``out_dir``'s last checkpoint; without it a
    folder that already holds a run is refused, so no run is overwritten. ``zero_filled`` (the test split's
    zero-filled metrics, computed when omitted) is reported beside the model's; ``info`` adds keys to
    metrics.json. Seeds the model's data order, masks and augmentation from ``seed``; the caller seeds the
    model's initialisation (``pytorch_lightning.seed_everything``) before building it. With a ``teacher`` the
    model is trained to follow it (:class:`~kronify.mri.training.distill.DistillReconModule`, loss weights
    ``distill``); ``max_steps`` 0 tests the model as it is (its checkpoint is written all the same).
    """
    out_dir = Path(out_dir)
    spec = preset.model(family) if family is not None else None
    if max_steps is None:
        max_steps = preset.steps_for(family) if family is not None else preset.max_steps
    resume_from = last_checkpoint(out_dir / "checkpoints")
    if resume_from is not None and not resume:
        raise RunFolderError(f"{out_dir} already holds a run ({resume_from}); pass --resume to continue it "
                             "or choose another --out")
    protocol = get_protocol(preset.protocol)
    planned = max(1, max_steps)  # the schedule and Trainer of a 0-step run (test only) are never stepped
    settings = dict(lr=preset.lr, milestones=preset.milestones(planned), ema_decay=preset.ema_decay,
                    protocol=protocol.name, schedule=preset.schedule, warmup=preset.warmup_steps(planned))
    loss = CompositeLoss(preset.alpha, preset.beta, preset.gamma)
    module = ReconModule(model, loss, **settings) if teacher is None else \
        DistillReconModule(model, teacher, distill or DistillWeights(), loss=loss, **settings)
    train = datasets["train"]
    patch = spec.train_patch if spec is not None else None  # evaluation stays on whole slices
    if patch is not None:
        if getattr(model, "needs_kspace", False):
            raise RunFolderError(f"{type(model).__name__} uses k-space (data consistency) and cannot train on "
                                 f"{patch}x{patch} patches")
        train = train.with_transform(train.transform.with_patch(min(patch, preset.crop)))
    datamodule = ReconDataModule(train, datasets["val"], datasets["test"], batch_size=preset.batch_size, seed=seed,
                                 num_workers=preset.num_workers, eval_batch_size=preset.eval_batch_size,
                                 phase_augment=preset.phase_augment, augment=preset.augment)
    trainer = make_trainer(out_dir, max_steps=planned, val_every=preset.val_every, ckpt_every=preset.ckpt_every,
                           accelerator=hardware.accelerator, devices=hardware.devices,
                           num_nodes=hardware.num_nodes, strategy=hardware.strategy, precision=preset.precision,
                           grad_clip=hardware.grad_clip, progress_bar=hardware.progress_bar)
    if max_steps > 0:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume and resume_from else None)
    trainer.test(module, datamodule=datamodule, verbose=False)
    if max_steps == 0:
        trainer.save_checkpoint(out_dir / "checkpoints" / LAST)  # the EMA weights, for recipes/evaluate.py
    try:
        if not trainer.is_global_zero:
            return {}
        test = datasets["test"]
        examples = reconstruct_examples(module.ema.module.eval(), test, example_indices(test))
        if zero_filled is None:
            zero_filled = zero_filled_metrics(test, preset.eval_batch_size)
        run_info = {
            "family": family, "train_seconds": module.train_seconds, "steps": trainer.global_step,
            "preset": preset.name, "batch_size": preset.batch_size, "lr": preset.lr,
            "loss": {"alpha": preset.alpha, "beta": preset.beta, "gamma": preset.gamma},
            "world_size": trainer.world_size, "test_files": test.files,  # for recipes/evaluate.py
            "phase_augment": preset.phase_augment, "zero_filled_start": preset.zero_filled_start,
            "augment": preset.augment.describe() if preset.augment is not None else "off", "train_patch": patch,
            "metrics_over": "slices" if protocol.metric_scope == "slice" else "volumes",
            **(info or {}),
        }
        return write_run(out_dir, run_info, module.test_metrics, examples, zero_filled=zero_filled,
                         history=module.history)
    finally:  # every rank returns once rank 0 has written the run, so what follows on any rank can read it
        trainer.strategy.barrier("run written")


def train_run(spec: RunSpec, preset: Preset, data: Data, build: ModelFactory, *,
              zero_filled: MetricsAccumulator | None = None) -> dict[str, Any]:
    """Build ``spec``'s model (seeded by its seed) with ``build`` and train, test and write it with
    :func:`train_and_test` (resuming when asked); returns its metrics.json content ({} on a non-zero DDP rank)."""
    if spec.resume and last_checkpoint(spec.out_dir / "checkpoints") is None and is_global_zero():
        print(f"--resume: no checkpoint in {spec.out_dir / 'checkpoints'}, starting {spec.name} from scratch",
              flush=True)
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    model, cost = build(spec, preset)
    info = {"model": spec.name, "kron_n": spec.kron_n, "algebra": spec.algebra if spec.kron_n else None,
            "acceleration": spec.acceleration, **cost,
            "data": "demo" if data.is_demo else str(data.root), "data_root": str(data.root.resolve()),
            **spec.masks.as_dict()}
    try:
        result = train_and_test(model, preset, data.datasets, spec.out_dir, family=spec.family, seed=spec.seed,
                                max_steps=spec.max_steps, resume=spec.resume, hardware=spec.hardware,
                                zero_filled=zero_filled, info=info)
    except RunFolderError as err:
        raise RecipeError(str(err)) from err
    if result:
        zf = result["zero_filled"]
        print(f"{spec.name} {spec.acceleration}x ({result['protocol']} protocol): test SSIM {result['ssim_mean']:.4f} "
              f"(zero-filled {zf['ssim_mean']:.4f}), PSNR {result['psnr_mean']:.2f} dB (zero-filled "
              f"{zf['psnr_mean']:.2f}), {result['steps']} steps in {result['train_seconds']:.0f} s -> "
              f"{spec.out_dir / 'metrics.json'}", flush=True)
    return result


def train_tasks(runs: Sequence[tuple[RunSpec, Data]], preset: Preset, build: ModelFactory, jobs: int = 1, *,
                zero_filled: MetricsAccumulator | None = None) -> list[Task]:
    """One :func:`train_run` task per (spec, data), for :func:`kronify.mri.experiments.jobs.run_tasks` with
    ``jobs``: side-by-side runs (``jobs`` > 1) show no progress bars, whose lines would interleave."""
    return [Task(train_run, (replace(spec, hardware=side_by_side(spec.hardware, jobs)), preset, data, build),
                 {"zero_filled": zero_filled}) for spec, data in runs]


def side_by_side(hardware: Hardware, jobs: int) -> Hardware:
    """``hardware`` for one of ``jobs`` runs going at once: no progress bar when ``jobs`` > 1 (the bars' lines
    would interleave)."""
    return replace(hardware, progress_bar=hardware.progress_bar and jobs == 1)


def train_runs(runs: Sequence[tuple[RunSpec, Data]], preset: Preset, build: ModelFactory, jobs: int = 1, *,
               zero_filled: MetricsAccumulator | None = None) -> list[dict[str, Any]]:
    """:func:`train_run` for each (spec, data), ``jobs`` at a time, each in its own process (:func:`train_tasks`).
    Returns the metrics.json contents in order ({} from a non-zero DDP rank)."""
    return run_tasks(train_tasks(runs, preset, build, jobs, zero_filled=zero_filled), jobs)
