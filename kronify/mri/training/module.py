"""Training and evaluation of reconstruction models with Lightning 2.x (``pytorch_lightning``).

:class:`ReconModule` is the paper's optimisation (SwinMR's recipe): the composite loss
(:class:`kronify.mri.losses.CompositeLoss`), Adam (lr 2e-4), MultiStepLR (×0.5 at the milestones), an EMA of
the weights (:class:`kronify.mri.training.ema.EMA`, decay 0.999, explicit warm-up) that is the model used for validation
and testing, optional gradient clipping (a Trainer option) and AMP on GPUs. Validation logs the loss, SSIM and
PSNR (and example images to TensorBoard); validation and test metrics, and the validation loss, are computed per
slice (:class:`kronify.mri.metrics.MetricsAccumulator`), gathered from every process with ``all_gather_object`` and
deduplicated by (file, slice), so a DistributedSampler's padding never counts a slice twice.

Its data come from :class:`kronify.mri.training.data_module.ReconDataModule`, whose training order is exactly
resumable. The global RNGs (torch on every device, numpy, random: dropout, drop-path) are reseeded before every
training step from (seed, step, rank), so they too are a function of the step alone. Resuming from ``last.ckpt``
restores weights, optimizer, scheduler, EMA, the loop position, the validation history, the elapsed training time
and the seed; the loader restarts at the restored global step. Saving a checkpoint involves no other process (no
collective in ``on_save_checkpoint``), so a checkpoint written by rank 0 alone never waits on the others.

The Trainer comes from :func:`kronify.mri.training.trainer.make_trainer`; the wrappers and
:func:`~kronify.mri.training.wrappers.reconstruct` from :mod:`kronify.mri.training.wrappers`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from kronify.mri.complex import magnitude
from kronify.mri.losses import CompositeLoss
from kronify.mri.metrics import MetricsAccumulator
from kronify.mri.training.ema import EMA
from kronify.mri.training.schedules import SCHEDULES, make_schedule
from kronify.mri.training.wrappers import reconstruct

__all__ = ["ReconModule", "gather_rows", "seed_global_rngs"]

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
        schedule, warmup: the learning-rate schedule (:mod:`kronify.mri.training.schedules`): ``"multistep"`` (the
            milestones) or ``"cosine"`` (``warmup`` linear warm-up steps, then a cosine to 0 at the trainer's
            ``max_steps``).
        ema_decay, ema_warmup: see :class:`kronify.mri.training.ema.EMA`.
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
        # (a subclass's extra arguments, e.g. DistillReconModule's teacher, are collected too: kept out as well)
        self.save_hyperparameters(ignore=["model", "loss", "lpips", "teacher", "weights"])
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
