"""Training and evaluation of reconstruction models with Lightning 2.x (``pytorch_lightning``).

:class:`ReconModule` is the paper's optimisation (SwinMR's recipe): the composite loss
(:class:`kronify.mri.losses.CompositeLoss`), Adam (lr 2e-4), MultiStepLR (×0.5 at the milestones), an EMA of
the weights (:class:`kronify.mri.ema.EMA`, decay 0.999, explicit warm-up) that is the model used for validation
and testing, optional gradient clipping (a Trainer option) and AMP on GPUs. Validation logs the loss, SSIM and
PSNR (and example images to TensorBoard); validation and test metrics, and the validation loss, are computed per
slice (:class:`kronify.mri.metrics.MetricsAccumulator`), gathered from every process with ``all_gather_object`` and
deduplicated by (file, slice), so a DistributedSampler's padding never counts a slice twice.

Its data come from :class:`kronify.mri.datamodule.ReconDataModule`, whose training order is exactly
resumable. The global RNGs (torch on every device, numpy, random: dropout, drop-path) are reseeded before every
training step from (seed, step, rank), so they too are a function of the step alone. Resuming from ``last.ckpt``
restores weights, optimizer, scheduler, EMA, the loop position, the validation history, the elapsed training time
and the seed; the loader restarts at the restored global step. Saving a checkpoint involves no other process (no
collective in ``on_save_checkpoint``), so a checkpoint written by rank 0 alone never waits on the others.

:func:`make_trainer` wires it together: step-based validation and checkpoints (:mod:`kronify.mri.checkpoint`,
atomic writes), CSV and TensorBoard logs, the progress bar, deterministic mode, DDP via devices/num_nodes/strategy.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn

from kronify.mri.checkpoint import AtomicCheckpointIO, LastCheckpoint
from kronify.mri.ema import EMA
from kronify.mri.losses import CompositeLoss
from kronify.mri.complex import magnitude
from kronify.mri.metrics import MetricsAccumulator
from kronify.mri.schedules import SCHEDULES, make_schedule

__all__ = [
    "PRECISIONS",
    "ReconModule",
    "ZeroFilledStart",
    "gather_rows",
    "make_trainer",
    "reconstruct",
    "resolve_precision",
    "seed_global_rngs",
]

PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")


def reconstruct(model: nn.Module, batch: Any) -> Tensor:
    """Run a zoo model on an :class:`~kronify.mri.data.MRISample` batch (MoDL also gets mask and k-space)."""
    if getattr(model, "needs_kspace", False):
        return model(batch.input, batch.mask, batch.kspace)
    return model(batch.input)


class ZeroFilledStart(nn.Module):
    """``x + gain·(f(x) − x)`` (or ``x + gain·f(x)`` when ``f`` predicts a correction), ``gain`` a learnable scalar
    starting at 0: the network's output starts *exactly* at the zero-filled image (ReZero/SkipInit-style).

    Randomly initialised reconstruction networks start far from the input (their first outputs have a
    mean-squared error 15–250× the zero-filled one on the demo data), and a short CPU run spends most of its
    steps getting back to it. This wrapper removes that phase; it adds one parameter and changes nothing else
    (the wrapped model, dense or Kronecker, is ``.model``). Used by the demo and tiny presets, not the paper one.

    ``gain_init`` 1 suits a model that already starts at its input (e.g. MoDL with ``denoiser_out_init`` near
    0): its output is then the model's own from the first step, and the gain no longer scales the network's
    updates down (the product of a small gain and a small output would learn slowly).
    """

    def __init__(self, model: nn.Module, correction: bool = False, gain_init: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(gain_init):
            raise ValueError(f"gain_init must be finite, got {gain_init}")
        self.model = model
        self.correction = bool(correction)
        self.gain = nn.Parameter(torch.tensor(float(gain_init)))

    @property
    def needs_kspace(self) -> bool:
        return bool(getattr(self.model, "needs_kspace", False))

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        y = self.model(x, *args)
        return x + self.gain * (y if self.correction else y - x)


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Concatenate every process's rows (``all_gather_object``); the rows themselves when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return [r for part in gathered for r in (part or [])]


def seed_global_rngs(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and every GPU), numpy and random from ``(seed, step, rank)``: the global random draws of a
    training step (dropout, drop-path) then depend on nothing but the run's seed, the step and the process, which
    makes a resumed run draw what the uninterrupted one drew without saving any RNG state."""
    words = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    value = int(words[0]) << 32 | int(words[1])
    torch.manual_seed(value)
    np.random.seed(int(words[0]))
    random.seed(value)


class ReconModule(pl.LightningModule):
    """A reconstruction network trained with the paper's loss and optimiser; evaluated through its EMA.

    Args:
        model: a zoo model (``forward(x)``, or ``forward(x, mask, kspace)`` when ``model.needs_kspace``).
        loss: the training loss ``loss(output, target) -> (total, terms)``; default ``CompositeLoss(15, 0.1, γ)``.
        lr, betas, weight_decay: Adam.
        milestones, lr_gamma: MultiStepLR, stepped every optimizer step (milestones are step counts).
        schedule, warmup: the learning-rate schedule (:mod:`kronify.mri.schedules`): ``"multistep"`` (the
            milestones) or ``"cosine"`` (``warmup`` linear warm-up steps, then a cosine to 0 at the trainer's
            ``max_steps``).
        ema_decay, ema_warmup: see :class:`kronify.mri.ema.EMA`.
        lpips: LPIPS for the test metrics (``"auto"``: used when its weights are on disk; None: skipped).
        log_images: log (zero-filled | output | target | error) of the first validation slice to TensorBoard.
        seed: the run's seed for :func:`seed_global_rngs` before every training step (>= 0); None: the torch seed
            at construction (``pl.seed_everything``'s). Saved in checkpoints and restored on resume.
        protocol: how validation and test slices are scored, "paper" or "fastmri" (kronify.mri.protocol).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module | None = None,
        *,
        lr: float = 2e-4,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        milestones: Sequence[int] = (),
        lr_gamma: float = 0.5,
        schedule: str = "multistep",
        warmup: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        lpips: Any = "auto",
        log_images: bool = True,
        seed: int | None = None,
        protocol: str = "fastmri",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        if list(milestones) != sorted(set(int(m) for m in milestones)) or any(m < 1 for m in milestones):
            raise ValueError(f"milestones must be increasing positive step counts, got {list(milestones)}")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if schedule not in SCHEDULES or warmup < 0:
            raise ValueError(f"schedule must be one of {SCHEDULES} with warmup >= 0, got {schedule!r}, {warmup}")
        self.save_hyperparameters(ignore=["model", "loss", "lpips"])
        self.model = model
        self.loss_fn = loss if loss is not None else CompositeLoss(gamma=0.0)
        self.ema = EMA(model, ema_decay, ema_warmup)
        self.lpips = lpips
        self.history: list[dict[str, float]] = []  # one entry per validation: step, loss, psnr, ssim
        self.test_metrics: MetricsAccumulator | None = None
        self._val_acc = MetricsAccumulator(lpips=None, protocol=protocol)
        self._test_acc: MetricsAccumulator | None = None
        self._val_losses: dict[tuple[str, int], float] = {}  # per validation slice
        self._seed = int(torch.initial_seed()) if seed is None else int(seed)
        self._train_seconds = 0.0
        self._fit_start: float | None = None
        self._example: dict[str, Tensor] | None = None

    # -- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.Adam(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                               weight_decay=hp.weight_decay)
        schedule, warmup = hp.get("schedule", "multistep"), hp.get("warmup", 0)
        total = self.trainer.max_steps if self._trainer is not None else 0
        sched = make_schedule(opt, schedule, total=total, milestones=hp.milestones, gamma=hp.lr_gamma,
                              warmup=warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def forward(self, batch: Any) -> Tensor:
        return reconstruct(self.model, batch)

    def training_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, unweighted terms) of the live model on a batch; the loss (FFTs) runs in float32 under AMP too."""
        output = reconstruct(self.model, batch).float()
        return self.loss_fn(output, batch.target.float())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_global_rngs(self._seed, self.global_step, self.global_rank)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, terms = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}; "
                                     "lower the learning rate or enable gradient clipping")
        bs = batch.input.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update (so any checkpoint written after the step includes both)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model)

    # -- timing ------------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_train_end(self) -> None:
        self._train_seconds = self.train_seconds
        self._fit_start = None

    @property
    def train_seconds(self) -> float:
        """Wall time spent in training so far (summed over resumed runs), validation included."""
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._train_seconds + running

    # -- evaluation --------------------------------------------------------------------------------------------
    def _eval_batch(self, batch: Any, acc: MetricsAccumulator) -> Tensor:
        """The EMA model's output on a batch, scored into ``acc``."""
        output = reconstruct(self.ema.module, batch).float()
        acc.update(output, batch.target.float(), batch.fname, batch.slice_num, batch.max_value, scale=batch.scale)
        return output

    def on_validation_epoch_start(self) -> None:
        self._val_acc.reset()
        self._val_losses = {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        output = self._eval_batch(batch, self._val_acc)
        target = batch.target.float()
        for i, key in enumerate(zip(map(str, batch.fname), map(int, batch.slice_num))):
            if key not in self._val_losses:  # the loss of each slice, once (batch means would count repeats)
                self._val_losses[key] = float(self.loss_fn(output[i:i + 1], target[i:i + 1])[0])
        if batch_idx == 0 and self._example is None:
            self._example = {"input": batch.input[0].float().cpu(), "output": output[0].cpu(),
                             "target": batch.target[0].float().cpu()}

    def on_validation_epoch_end(self) -> None:
        rows = gather_rows(self._val_acc.state())
        merged = MetricsAccumulator(lpips=None).merge(rows)
        losses: dict[tuple[str, int], float] = {}
        for row in gather_rows([{"key": key, "loss": loss} for key, loss in self._val_losses.items()]):
            losses.setdefault(tuple(row["key"]), row["loss"])  # a DistributedSampler's padding repeats slices
        val_loss = sum(losses.values()) / len(losses) if losses else float("nan")
        summary = merged.summary()
        psnr, ssim = summary["psnr_mean"], summary["ssim_mean"]
        # Already gathered: every process logs the same values (sync_dist only averages equal numbers).
        self.log("val/loss", val_loss, sync_dist=True)
        self.log("val/psnr", float("nan") if psnr is None else psnr, prog_bar=True, sync_dist=True)
        self.log("val/ssim", float("nan") if ssim is None else ssim, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.history.append({"step": int(self.global_step), "val_loss": val_loss,
                                 "val_psnr": psnr, "val_ssim": ssim})
            self._log_example_images()
        self._example = None

    def _log_example_images(self) -> None:
        if self._example is None or not self.trainer.is_global_zero or not self.hparams.log_images:
            return
        mags = [magnitude(self._example[k]) for k in ("input", "output", "target")]
        peak = mags[2].max().clamp_min(1e-12)
        err = (mags[1] - mags[2]).abs()
        panels = [m / peak for m in mags] + [err / err.max().clamp_min(1e-12)]
        image = torch.cat(panels, dim=-1).clamp(0, 1).unsqueeze(0)  # (1, H, 4W)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/zero_filled|output|target|error", image, self.global_step)

    def on_test_epoch_start(self) -> None:
        self._test_acc = MetricsAccumulator(lpips=self.lpips, protocol=self.hparams.protocol)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        assert self._test_acc is not None
        self._eval_batch(batch, self._test_acc)

    def on_test_epoch_end(self) -> None:
        assert self._test_acc is not None
        merged = MetricsAccumulator(lpips=self._test_acc.lpips).merge(gather_rows(self._test_acc.state()))
        self.test_metrics = merged
        summary = merged.summary()
        for key in ("ssim_mean", "psnr_mean", "nmse_mean", "phase_error_mean"):
            if summary[key] is not None:
                self.log(f"test/{key[:-5]}", summary[key], sync_dist=True)

    # -- checkpoint extras -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """This process's own state only, no collective: whichever processes save, none waits on another."""
        checkpoint["kronify"] = {"history": list(self.history), "train_seconds": self.train_seconds,
                                 "seed": self._seed}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("kronify")
        if extra is None:
            return
        self.history = list(extra["history"])
        self._train_seconds = float(extra["train_seconds"])
        self._seed = int(extra.get("seed", self._seed))  # older checkpoints saved RNG states instead


# ---------------------------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------------------------
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
        enable_checkpointing=False,  # LastCheckpoint replaces ModelCheckpoint (see kronify.mri.checkpoint)
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, val_every)),
        plugins=[AtomicCheckpointIO()],
    )

