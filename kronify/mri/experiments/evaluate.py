"""Evaluation: metrics.json, per-volume and per-slice CSVs, a reconstruction figure, example slices; and
:func:`evaluate_run`, which evaluates a finished recipe run's EMA weights on its test split or on any
fastMRI-format folder (``recipes/evaluate.py``), optionally exporting the reconstructions (:mod:`kronify.mri.experiments.export`).

The metrics are :class:`kronify.mri.metrics.MetricsAccumulator`'s (fastMRI SSIM/PSNR/NMSE on magnitudes, phase
error, LPIPS when its weights are on disk), computed with the EMA weights. During training they come from
:meth:`kronify.mri.training.module.ReconModule.test_step`, gathered over every process.
``mean (std)`` are over slices, like the paper's table; the per-volume CSV has fastMRI's volume metrics.
"""

from __future__ import annotations

import json
import math
import os
import platform
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
from kronify.mri.experiments.figures import reconstruction_figure
from kronify.mri.metrics import MetricsAccumulator, write_csv
from kronify.mri.protocol import Protocol, get_protocol
from kronify.mri.experiments.statistics import paired_comparison
from kronify.mri.errors import RunError
from kronify.mri.experiments.run_folder import TrainedRun
from kronify.mri.training.wrappers import reconstruct

__all__ = [
    "FIXED_MASK",
    "METRICS_KEYS",
    "RECONSTRUCTIONS",
    "evaluate_run",
    "evaluation_dataset",
    "example_indices",
    "machine_description",
    "per_volume",
    "reconstruct_examples",
    "versus_zero_filled",
    "write_json",
    "write_results",
    "zero_filled_metrics",
]

#: The keys every metrics.json has (others may follow).
METRICS_KEYS = ("model", "kron_n", "acceleration", "params", "gflops", "ssim_mean", "ssim_std", "psnr_mean",
                "psnr_std", "nmse_mean", "phase_error_mean", "lpips_mean", "lpips_std", "train_seconds", "steps")
#: The folder of :func:`evaluate_run`'s output that holds the exported reconstructions.
RECONSTRUCTIONS = "reconstructions"
#: The file of :func:`evaluate_run`'s output that holds the one column mask of a fixed-mask evaluation.
FIXED_MASK = "mask.npy"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def machine_description() -> str:
    """CPU model, usable cores, GPU and library versions, for recording where a result came from."""
    import pytorch_lightning as pl

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {cores} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"pytorch_lightning {pl.__version__}, {torch.get_num_threads()} torch threads")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1) + "\n")
    os.replace(tmp, path)


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


def _magnitude(x: np.ndarray) -> np.ndarray:
    return magnitude(torch.as_tensor(x)).numpy()


def per_volume(metrics: MetricsAccumulator, metric: str) -> dict[str, float]:
    """``{volume: metric}`` at the accumulator's scope: fastMRI's volume metric (``fastmri``), or the mean of
    the volume's slice metrics (``paper``, which scores slices), as kronify.mri.experiments.study reads finished runs."""
    if metrics.protocol.metric_scope != "slice":
        return {row["fname"]: float(row[metric]) for row in metrics.volume_rows()}
    values: dict[str, list[float]] = {}
    for row in metrics.slice_rows():
        values.setdefault(row["fname"], []).append(float(row[metric]))
    return {name: float(np.mean(v)) for name, v in values.items()}


def versus_zero_filled(metrics: MetricsAccumulator, zero_filled: MetricsAccumulator) -> dict[str, dict[str, Any]]:
    """Model minus zero-filling, paired over the scored volumes, for PSNR and SSIM (mean difference, 95 % t and
    bootstrap CIs, Wilcoxon p: :func:`kronify.mri.experiments.statistics.paired_comparison`); does the model beat it?"""
    return {m: paired_comparison(per_volume(metrics, m), per_volume(zero_filled, m)).as_dict() for m in ("psnr", "ssim")}


def write_results(
    out_dir: str | os.PathLike,
    info: Mapping[str, Any],
    metrics: MetricsAccumulator,
    examples: Sequence[Mapping[str, Any]] = (),
    *,
    zero_filled: MetricsAccumulator | None = None,
    history: Sequence[Mapping[str, Any]] | None = (),
) -> dict[str, Any]:
    """Write ``metrics.json`` (``info`` + the summary; with ``zero_filled``, its summary and the paired
    model-minus-zero-filled comparison ``vs_zero_filled``), ``per_volume.csv``, ``per_slice.csv``
    (``zero_filled_per_volume.csv``), ``history.json`` (unless ``history`` is None), ``examples.npz`` and
    ``reconstruction.png`` into ``out_dir``; returns the metrics.json content. The figure's title names ``info``'s ``protocol`` and ``eval_set`` when present."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = metrics.summary()
    result: dict[str, Any] = {key: info.get(key) for key in METRICS_KEYS}
    result.update({k: v for k, v in info.items() if k not in result})
    result.update(summary)
    result["lpips_message"] = metrics.lpips_message
    if zero_filled is not None:
        zf = zero_filled.summary()
        result["zero_filled"] = {k: zf[k] for k in ("ssim_mean", "ssim_std", "psnr_mean", "psnr_std", "nmse_mean",
                                                     "phase_error_mean", "lpips_mean", "lpips_std")}
        result["vs_zero_filled"] = versus_zero_filled(metrics, zero_filled)
        write_csv(zero_filled.volume_rows(), out_dir / "zero_filled_per_volume.csv")
    write_json(out_dir / "metrics.json", result)
    write_csv(metrics.volume_rows(), out_dir / "per_volume.csv")
    write_csv(metrics.slice_rows(), out_dir / "per_slice.csv")
    if history is not None:
        write_json(out_dir / "history.json", list(history))
    if examples:
        np.savez_compressed(
            out_dir / "examples.npz",
            fname=np.array([e["fname"] for e in examples]),
            slice_num=np.array([e["slice_num"] for e in examples]),
            zero_filled=np.stack([e["zero_filled"] for e in examples]),
            output=np.stack([e["output"] for e in examples]),
            target=np.stack([e["target"] for e in examples]),
        )
        first = examples[0]
        protocol = f", {info['protocol']} protocol" if info.get("protocol") else ""
        label = f"{info.get('model')} ({info.get('acceleration')}x{protocol})"
        scored = f" on {info['eval_set']}" if info.get("eval_set") else ""
        reconstruction_figure(
            out_dir / "reconstruction.png", _magnitude(first["zero_filled"]), _magnitude(first["output"]),
            _magnitude(first["target"]),
            title=f"{label}: {first['fname']} slice {first['slice_num']}  |  {'' if scored else 'test '}SSIM "
                  f"{result['ssim_mean']:.3f}, PSNR {result['psnr_mean']:.2f} dB{scored}",
            labels={"output": str(info.get("model"))},
        )
    return result


def _on_device(batch: Any, device: torch.device) -> Any:
    return batch._replace(**{k: v.to(device) for k, v in batch._asdict().items() if isinstance(v, torch.Tensor)})


@torch.no_grad()
def evaluate_run(
    run: TrainedRun,
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
    return write_results(out_dir, described, metrics, examples, zero_filled=zero_filled, history=None)
