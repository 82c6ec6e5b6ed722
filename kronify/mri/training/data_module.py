"""The training data of a reconstruction run, in an exactly resumable order: :class:`ReconDataModule`.

The training order is a pure function of the seed and the global batch index (:class:`StepBatchSampler`: a
seeded permutation per pass over the data, sliced per process), every sample gets its own seed for its random
undersampling mask and augmentation (:class:`SeededSamples`), and every DataLoader draws from a private generator,
so neither worker count nor a restart nor a validation pass changes what the next step sees. Training samples
may get a random global phase (:func:`rotate_phase`, exact for MRI data) and the augmentation of
:mod:`kronify.mri.data.augment` before masking; validation and test samples never do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kronify.mri.data.augment import AugmentConfig

__all__ = ["ReconDataModule", "SeededSamples", "StepBatchSampler", "mri_reseed", "rotate_phase"]


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for global batches ``start .. total-1``, this process's ``(index, sample_seed)`` pairs.

    The global sample stream is the concatenation of seeded permutations of the dataset (pass ``e`` uses seed
    ``(seed, e)``); global batch ``g`` is stream positions ``[g·B·W, (g+1)·B·W)`` of which process ``r`` takes
    ``[g·B·W + r·B, g·B·W + (r+1)·B)`` (B = per-process batch, W = processes). The sample seed is a function of
    the global position, so the whole run is fixed by ``seed`` and the global batch size.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, total: int, start: int = 0,
                 rank: int = 0, world_size: int = 1, length: int | None = None) -> None:
        if num_items < 1:
            raise ValueError("the training set is empty")
        if not 0 <= start <= total:
            raise ValueError(f"start batch {start} outside [0, {total}]")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.total, self.start, self.rank, self.world_size = total, start, rank, world_size
        self.length = total - start if length is None else length
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_items)}
        return self._perms[epoch]

    def _item(self, pos: int) -> tuple[int, int]:
        epoch, offset = divmod(pos, self.num_items)
        sample_seed = int(np.random.SeedSequence([self.seed, pos]).generate_state(1)[0])
        return int(self._perm(epoch)[offset]), sample_seed

    def __iter__(self):
        per_batch = self.batch_size * self.world_size
        for g in range(self.start, self.total):
            first = g * per_batch + self.rank * self.batch_size
            yield [self._item(first + j) for j in range(self.batch_size)]

    def __len__(self) -> int:
        return self.length


def rotate_phase(sample: Any, seed: int) -> Any:
    """Multiply the sample's complex images and k-space by one random global phase e^{iφ} (φ from ``seed``).

    MRI data carry an arbitrary global phase, and the measurement model is linear, so this is an exact
    augmentation: input, target and k-space stay consistent, the mask is unchanged. It keeps a real-valued
    network from tying its output to the phase maps of the few training volumes of a small dataset.
    """
    phi = float(np.random.default_rng([seed, 0x9E3779B9]).uniform(0.0, 2.0 * math.pi))
    c, s = math.cos(phi), math.sin(phi)

    def rot(x: Tensor) -> Tensor:
        return torch.stack((c * x[0] - s * x[1], s * x[0] + c * x[1]))

    return sample._replace(input=rot(sample.input), target=rot(sample.target), kspace=rot(sample.kspace))


class SeededSamples(Dataset):
    """Wraps a map-style dataset: item ``(index, seed)`` calls ``reseed(seed)``, reads ``dataset[index]`` and
    applies ``augment(sample, seed)``, so every random draw of a training sample is fixed by its seed."""

    def __init__(self, dataset: Dataset, reseed: Callable[[int], None] | None,
                 augment: Callable[[Any, int], Any] | None = None) -> None:
        self.dataset = dataset
        self.reseed = reseed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if self.reseed is not None:
            self.reseed(seed)
        sample = self.dataset[index]
        return self.augment(sample, seed) if self.augment is not None else sample


def mri_reseed(dataset: Dataset) -> Callable[[int], None] | None:
    """The per-sample reseed hook for a kronify.mri dataset: seeds its transform's training mask draws."""
    transform = getattr(dataset, "transform", None)
    if not hasattr(transform, "reseed") or getattr(transform, "fixed_mask", False):
        return None
    return transform.reseed


class _ResumableLoader(DataLoader):
    """A DataLoader over :class:`StepBatchSampler` that Lightning treats as resumable (``state_dict``)."""

    def state_dict(self) -> dict[str, Any]:
        s = self.batch_sampler
        return {"seed": s.seed, "batch_size": s.batch_size, "world_size": s.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state != mine:
            warnings.warn(f"resuming with a different data set-up ({state} -> {mine}): the training order after "
                          "the restart differs from the original run's", stacklevel=2)


class ReconDataModule(pl.LightningDataModule):
    """Train/val/test loaders for :class:`ReconModule`.

    ``batch_size`` is the *global* batch (split over the processes), so 1 or N GPUs train the same thing.
    ``phase_augment`` applies :func:`rotate_phase` to training samples; ``augment`` (an
    :class:`kronify.mri.data.augment.AugmentConfig`) augments every training slice before it is masked (through its
    transform's :meth:`~kronify.mri.data.transforms.MRITransform.with_augment`; drawn anew per sample, fixed by the
    sample's seed; validation and test are never augmented). Validation/test loaders are sharded with
    a non-shuffling DistributedSampler when there are several processes.
    """

    def __init__(self, train: Dataset | None, val: Dataset | None, test: Dataset | None, *, batch_size: int,
                 seed: int = 0, num_workers: int = 0, eval_batch_size: int | None = None,
                 reseed: Callable[[int], None] | None = None, phase_augment: bool = False,
                 augment: AugmentConfig | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if augment is not None and augment.enabled:
            if train is None or not hasattr(getattr(train, "transform", None), "with_augment"):
                raise ValueError("augment needs a kronify.mri training set (its transform augments before masking)")
            train = train.with_transform(train.transform.with_augment(augment, seed))
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.reseed = reseed if reseed is not None else (mri_reseed(train) if train is not None else None)
        self.phase_augment = phase_augment

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        total = trainer.max_steps
        if total is None or total < 0:
            raise ValueError("training is step-based: set Trainer(max_steps=...)")
        # When resuming, Lightning has restored the loop before asking for the loader: start at the next step.
        done_in_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        rank, world = self._world()
        return self.make_train_loader(total, start=trainer.global_step, length=total - trainer.global_step +
                                      done_in_epoch, rank=rank, world_size=world)

    def make_train_loader(self, total: int, *, start: int = 0, length: int | None = None, rank: int = 0,
                          world_size: int = 1) -> DataLoader:
        """The training loader for global batches ``start .. total-1`` of this process (see StepBatchSampler)."""
        if self.train_set is None:
            raise ValueError("no training set")
        if self.batch_size % world_size:
            raise ValueError(f"batch size {self.batch_size} is not divisible by the {world_size} processes")
        sampler = StepBatchSampler(len(self.train_set), self.batch_size // world_size, seed=self.seed, total=total,
                                   start=start, rank=rank, world_size=world_size, length=length)
        augment = rotate_phase if self.phase_augment else None
        return _ResumableLoader(SeededSamples(self.train_set, self.reseed, augment), batch_sampler=sampler,
                                num_workers=self.num_workers, generator=self._generator(1),
                                persistent_workers=self.num_workers > 0)

    def _eval_loader(self, dataset: Dataset | None, name: str, offset: int) -> DataLoader:
        if dataset is None:
            raise ValueError(f"no {name} set")
        rank, world = self._world()
        sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, generator=self._generator(offset))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "validation", 2)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set, "test", 3)


