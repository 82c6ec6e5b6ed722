"""Crash-safe checkpoints: an atomic CheckpointIO plugin and a step-based "last.ckpt" callback.

Why not Lightning's own writer: in the installed Lightning (2.6) ``TorchCheckpointIO`` saves through an fsspec
transaction, whose local commit moves a file from the *system* temp folder onto the target with
``shutil.move``. When the temp folder and the run folder are on different file systems (common: tmpfs /tmp,
network or scratch run folders) that move is a copy, so a kill during it leaves a truncated ``last.ckpt``, and
the data is never fsync'ed. :class:`AtomicCheckpointIO` writes a temporary file *in the target folder*,
fsyncs it and ``os.replace``-s it onto the target, which is atomic on POSIX: a killed run leaves either the
previous complete checkpoint or the new one, never a partial file.

Why not ``ModelCheckpoint(save_last=True)``: it writes ``last.ckpt`` at ``on_train_batch_end``, which runs
*before* that step's validation; on resume Lightning then skips the validation of that step (it assumes it
ran), so the validation history of a resumed run loses a point. It also writes no final checkpoint when the
last step is not a multiple of ``every_n_train_steps``. :class:`LastCheckpoint` saves every ``every`` steps,
after validation when validation is due at that step, and always at the end of training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "atomic_torch_save", "last_checkpoint"]

LAST = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # persist the rename itself
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose saves are atomic (see the module docstring); loading is unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)


def last_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """``ckpt_dir/last.ckpt`` when it exists, else None."""
    path = Path(ckpt_dir) / LAST
    return path if path.is_file() else None


class LastCheckpoint(pl.Callback):
    """Keep ``dirpath/last.ckpt`` current: every ``every`` optimizer steps and at the end of training.

    At a step where validation runs, the save waits for ``on_validation_end`` so the checkpoint holds that
    validation's results and Lightning's resume logic (restart after validation) does not skip it.
    Assumes step-based validation (``val_check_interval`` = k steps, ``check_val_every_n_epoch=None``) and no
    gradient accumulation, as :func:`kronify.mri.training.trainer.make_trainer` configures.
    """

    def __init__(self, dirpath: str | os.PathLike, every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {every}")
        self.dirpath = Path(dirpath)
        self.every = int(every)
        self._saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    @staticmethod
    def _validates_now(trainer: pl.Trainer) -> bool:
        every = trainer.val_check_batch
        return (trainer.enable_validation and every not in (None, float("inf"))
                and trainer.global_step % int(every) == 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0 and not self._validates_now(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.state.fn == "fit" and not trainer.sanity_checking
                and trainer.global_step % self.every == 0 and trainer.global_step != self._saved_step):
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer)
