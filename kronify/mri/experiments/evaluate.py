"""Scoring: the zero-filled baseline (:func:`zero_filled_metrics`), the example slices every model is shown on
(:func:`example_indices`, :func:`reconstruct_examples`), and :func:`evaluate_run`, which evaluates a finished recipe run's EMA weights on its test split or on any
fastMRI-format folder (``recipes/evaluate.py``), optionally exporting the reconstructions (:mod:`kronify.mri.experiments.export`).

The metrics are :class:`kronify.mri.metrics.MetricsAccumulator`'s (fastMRI SSIM/PSNR/NMSE on magnitudes, phase
error, LPIPS when its weights are on disk), computed with the EMA weights. During training they come from
:meth:`kronify.mri.training.module.ReconModule.test_step`, gathered over every process.
``mean (std)`` are over slices, like the paper's table; the per-volume CSV has fastMRI's volume metrics. The
run folder is written by :func:`kronify.mri.experiments.run_folder.write_run`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kronify.mri.training.checkpoint import LAST
from kronify.mri.complex import magnitude
from kronify.mri.data.datasets import evaluation_dataset
from kronify.mri.data.volumes import DEFAULT_ACQUISITIONS
from kronify.mri.errors import DataError
from kronify.mri.experiments.export import ReconstructionWriter
from kronify.mri.metrics import MetricsAccumulator
from kronify.mri.protocol import Protocol, get_protocol
from kronify.mri.errors import RunError
from kronify.mri.experiments.run_folder import RunRecord, write_run
from kronify.mri.training.wrappers import reconstruct

__all__ = ["FIXED_MASK", "RECONSTRUCTIONS", "evaluate_run", "example_indices", "reconstruct_examples",
           "zero_filled_metrics"]

#: The folder of :func:`evaluate_run`'s output that holds the exported reconstructions.
RECONSTRUCTIONS = "reconstructions"
#: The file of :func:`evaluate_run`'s output that holds the one column mask of a fixed-mask evaluation.
FIXED_MASK = "mask.npy"


@torch.no_grad()
def zero_filled_metrics(dataset: Dataset, batch_size: int = 8) -> MetricsAccumulator:
    """Metrics of the zero-filled input itself (the no-learning baseline) on ``dataset``."""
    acc = MetricsAccumulator(lpips="auto", protocol=getattr(dataset, "protocol", None))
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        acc.update(batch.input, batch.target, batch.fname, batch.slice_num, batch.max_value, scale=batch.scale)
    return acc


def example_indices(dataset: Dataset, count: int = 2) -> list[int]:
    """Dataset indices of the central slice of the first ``count`` volumes (fixed choices, same for all models)."""
    records = getattr(dataset, "raw_samples", None)
    if records is None:
        return list(range(min(count, len(dataset))))
    by_file: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_file.setdefault(Path(str(rec[0])).name, []).append(i)
    chosen = []
    for name in sorted(by_file)[:count]:
        idx = by_file[name]
        chosen.append(idx[len(idx) // 2])
    return chosen


@torch.no_grad()
def reconstruct_examples(model: nn.Module | None, dataset: Dataset, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Zero-filled, output and target complex images (2, H, W) in the data's units for chosen slices.

    ``model`` None gives the zero-filled image as the output (the baseline row).
    """
    examples = []
    param = next(model.parameters(), None) if model is not None else None
    device = param.device if param is not None else torch.device("cpu")
    for i in indices:
        sample = dataset[i]
        batch = type(sample)(*(torch.as_tensor(v)[None].to(device) if isinstance(v, torch.Tensor) else [v]
                               for v in sample))
        output = reconstruct(model, batch).float() if model is not None else batch.input
        scale = float(sample.scale)
        examples.append({
            "fname": sample.fname, "slice_num": int(sample.slice_num), "max_value": float(sample.max_value),
            "zero_filled": (sample.input * scale).numpy(), "output": (output[0].cpu() * scale).numpy(),
            "target": (sample.target * scale).numpy(),
        })
    return examples


def _on_device(batch: Any, device: torch.device) -> Any:
    return batch._replace(**{k: v.to(device) for k, v in batch._asdict().items() if isinstance(v, torch.Tensor)})


@torch.no_grad()
def evaluate_run(
    run: RunRecord,
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    crop: int | Sequence[int],
    protocol: str | Protocol | None = None,
    data_root: str | os.PathLike | None = None,
    num_slices: int | None = None,
    acquisitions: Collection[str] | None = DEFAULT_ACQUISITIONS,
    save_reconstructions: bool = False,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``run``'s EMA weights on its own test split, or on every volume under ``data_root``.

    ``model`` is the run's architecture, built as its recipe built it; the EMA weights from the run's checkpoint
    are loaded into it. The slices are the run's (``crop``, ``num_slices``, ``acquisitions``, its acceleration
    and mask settings), undersampled, normalised and scored under ``protocol`` (default: the run's own; see
    :func:`evaluation_dataset`). Into ``out_dir`` go metrics.json (the run's description, the scores, a
    ``zero_filled`` block, the protocol and mask settings used, and ``eval_*`` keys saying what was scored;
    ``info`` adds or replaces keys), per_volume.csv, per_slice.csv, reconstruction.png and examples.npz; with
    ``save_reconstructions`` also ``out_dir/reconstructions/<file>.h5`` in fastMRI's submission layout
    (:mod:`kronify.mri.experiments.export`). Everything is checked before anything is written, and the run folder is never
    written to. Returns the metrics.json content.
    """
    out_dir = Path(out_dir).expanduser()
    if (out_dir / "checkpoints" / LAST).exists():
        raise RunError(f"output folder {out_dir} holds a training run (checkpoints/{LAST}); its metrics.json "
                       "would be overwritten: choose another output folder")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if data_root is None:
        root, files, eval_set = run.data_root, run.test_files, "the run's test split"
        if root is None:
            raise RunError(f"{run.path / 'metrics.json'} does not record the run's data folder; "
                           "pass a data folder to evaluate on")
        if not root.is_dir():
            raise DataError(f"the run's data folder {root} does not exist any more; pass a data folder "
                            "to evaluate on")
    else:
        root, files, eval_set = Path(data_root).expanduser(), None, "all volumes"
        if not root.is_dir():
            raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    protocol = get_protocol(protocol or run.protocol)
    masks = {"protocol": protocol.name, "mask_type": run.info.get("mask_type") or "random",
             "center_fraction": run.info.get("center_fraction"),
             # the run's choice under its own protocol, else the evaluation protocol's default
             "fixed_mask": run.info.get("fixed_mask") if protocol.name == run.protocol else None}
    dataset = evaluation_dataset(root, files, crop=crop, acceleration=int(run.info["acceleration"]),
                                 num_slices=num_slices, acquisitions=acquisitions, **masks)
    masks["fixed_mask"] = dataset.transform.mask is not None
    device = torch.device(device)
    model = run.load_ema_weights(model).to(device)

    metrics, zero_filled = (MetricsAccumulator(lpips="auto", protocol=protocol) for _ in range(2))
    writer = ReconstructionWriter(out_dir / RECONSTRUCTIONS) if save_reconstructions else None
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        batch = _on_device(batch, device)
        output = reconstruct(model, batch).float()
        for acc, image in ((metrics, output), (zero_filled, batch.input)):
            acc.update(image, batch.target, batch.fname, batch.slice_num, batch.max_value, scale=batch.scale)
        if writer is not None:
            images = magnitude(output * batch.scale.view(-1, 1, 1, 1)).cpu().numpy()
            for fname, slice_num, image in zip(batch.fname, batch.slice_num.tolist(), images):
                writer.add(fname, slice_num, image)
    if writer is not None:
        writer.close()

    results = ("zero_filled", "lpips_message", "n_slices", "n_volumes", "test_files", "metrics_over")
    described = {k: v for k, v in run.info.items() if k not in results and not k.endswith(("_mean", "_std"))}
    described.update(masks)
    described.update({
        "run_protocol": run.protocol, "eval_run": str(run.path), "eval_checkpoint": str(run.checkpoint),
        "eval_weights": "ema", "eval_data": str(root.resolve()), "eval_set": eval_set,
        "eval_files": list(dataset.files), "eval_device": str(device),
    })
    described.update(info or {})
    if dataset.transform.mask is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / FIXED_MASK, dataset.transform.mask.numpy())
    examples = reconstruct_examples(model, dataset, example_indices(dataset))
    return write_run(out_dir, described, metrics, examples, zero_filled=zero_filled, history=None)
