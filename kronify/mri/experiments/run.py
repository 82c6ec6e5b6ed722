"""Train one reconstruction model under a preset, test its EMA weights and write the run folder.

:func:`train_and_test` is what every recipe runs for each of its models (recipes/_common.py builds the zoo
model and reads the command line): Lightning training with the preset's loss, learning-rate schedule, EMA,
augmentation and training patches, then the test split scored with the EMA weights and written by
:func:`kronify.mri.experiments.evaluate.write_results` (metrics.json with the paired comparison against zero-filling,
CSVs, figure, examples, validation history, checkpoints and logs). From Python it trains any model that maps a
zero-filled image to an image (or, with ``needs_kspace``, also takes k-space and mask, as MoDL does)::

    result = train_and_test(model, get_preset("demo"), datasets, "out/my_model", seed=0)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kronify.mri.training.checkpoint import last_checkpoint
from kronify.mri.experiments.evaluate import example_indices, reconstruct_examples, write_results, zero_filled_metrics
from kronify.mri.losses import CompositeLoss
from kronify.mri.metrics import MetricsAccumulator
from kronify.mri.experiments.presets import Preset
from kronify.mri.protocol import get_protocol
from kronify.mri.training.data_module import ReconDataModule
from kronify.mri.training.module import ReconModule
from kronify.mri.training.trainer import make_trainer

from kronify.mri.errors import RunFolderError

__all__ = ["Hardware", "RunFolderError", "train_and_test"]



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
) -> dict[str, Any]:
    """Train ``model`` on ``datasets["train"]`` (validating on ``"val"``), test its EMA weights on ``"test"`` and
    write the run into ``out_dir``; returns the metrics.json content ({} on a non-zero DDP rank).

    ``family`` picks the preset's step count and training patches (its :class:`~kronify.mri.experiments.presets.ModelSpec`);
    ``max_steps`` overrides the steps. ``resume`` continues from ``out_dir``'s last checkpoint; without it a
    folder that already holds a run is refused, so no run is overwritten. ``zero_filled`` (the test split's
    zero-filled metrics, computed when omitted) is reported beside the model's; ``info`` adds keys to
    metrics.json. Seeds the model's data order, masks and augmentation from ``seed``; the caller seeds the
    model's initialisation (``pytorch_lightning.seed_everything``) before building it.
    """
    out_dir = Path(out_dir)
    spec = preset.model(family) if family is not None else None
    max_steps = max_steps or (preset.steps_for(family) if family is not None else preset.max_steps)
    resume_from = last_checkpoint(out_dir / "checkpoints")
    if resume_from is not None and not resume:
        raise RunFolderError(f"{out_dir} already holds a run ({resume_from}); pass --resume to continue it "
                             "or choose another --out")
    protocol = get_protocol(preset.protocol)
    module = ReconModule(model, CompositeLoss(preset.alpha, preset.beta, preset.gamma), lr=preset.lr,
                         milestones=preset.milestones(max_steps), ema_decay=preset.ema_decay, protocol=protocol.name,
                         schedule=preset.schedule, warmup=preset.warmup_steps(max_steps))
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
    trainer = make_trainer(out_dir, max_steps=max_steps, val_every=preset.val_every, ckpt_every=preset.ckpt_every,
                           accelerator=hardware.accelerator, devices=hardware.devices,
                           num_nodes=hardware.num_nodes, strategy=hardware.strategy, precision=preset.precision,
                           grad_clip=hardware.grad_clip, progress_bar=hardware.progress_bar)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume and resume_from else None)
    trainer.test(module, datamodule=datamodule, verbose=False)
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
    return write_results(out_dir, run_info, module.test_metrics, examples, zero_filled=zero_filled,
                         history=module.history)
