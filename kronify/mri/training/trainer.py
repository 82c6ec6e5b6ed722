"""The Lightning Trainer of every run: :func:`make_trainer` (step-based validation and checkpoints, atomic writes,
CSV + TensorBoard logs, progress bar, deterministic mode, DDP via devices/num_nodes/strategy) and the precision
rule (:func:`resolve_precision`: AMP only on GPUs).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from kronify.mri.training.checkpoint import AtomicCheckpointIO, LastCheckpoint

__all__ = ["PRECISIONS", "make_trainer", "resolve_precision"]

PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")


def _uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision: ``auto`` = bf16-mixed (or 16-mixed) on GPUs, 32-true on CPU; AMP only on GPUs."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    gpu = _uses_gpu(accelerator)
    if precision == "auto":
        if not gpu:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision != "32-true" and not gpu:
        raise ValueError(f"precision {precision!r} (AMP) needs a GPU; use 32-true on {accelerator!r}")
    return precision


def make_trainer(
    out_dir: str | os.PathLike,
    *,
    max_steps: int,
    val_every: int,
    ckpt_every: int,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "auto",
    grad_clip: float | None = None,
    deterministic: bool | None = None,
    progress_bar: bool = True,
    callbacks: Sequence[pl.Callback] = (),
) -> pl.Trainer:
    """A step-based Trainer: validation every ``val_every`` steps, ``out_dir/checkpoints/last.ckpt`` every
    ``ckpt_every`` steps and at the end (atomic writes), CSV + TensorBoard logs under ``out_dir/logs``.

    ``deterministic`` None: deterministic algorithms on CPU (exact resume), ``"warn"`` on GPUs (some CUDA kernels,
    e.g. bilinear upsampling's backward, have no deterministic version).
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    out_dir = Path(out_dir)
    gpu = _uses_gpu(accelerator)
    # CSV: a new version_N folder per (re)start, as Lightning's CSV writer would overwrite an existing one.
    loggers = [CSVLogger(out_dir / "logs", name="csv"),
               TensorBoardLogger(out_dir, name="logs", version="tensorboard", default_hp_metric=False)]
    cbs: list[pl.Callback] = [LastCheckpoint(out_dir / "checkpoints", ckpt_every),
                              LearningRateMonitor(logging_interval="step")]
    if progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, min(50, max_steps // 20))))
    cbs.extend(callbacks)
    val_every = max(1, min(int(val_every), max_steps))
    # The EMA copy is in eval mode on purpose; Lightning would warn about it at every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    return pl.Trainer(
        default_root_dir=out_dir,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=resolve_precision(precision, accelerator),
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=grad_clip,
        deterministic=deterministic if deterministic is not None else ("warn" if gpu else True),
        use_distributed_sampler=False,  # ReconDataModule shards itself (exact, resumable order)
        logger=loggers,
        callbacks=cbs,
        enable_checkpointing=False,  # LastCheckpoint replaces ModelCheckpoint (see kronify.mri.training.checkpoint)
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, val_every)),
        plugins=[AtomicCheckpointIO()],
    )
