"""Test-split evaluation: metrics.json, per-volume and per-slice CSVs, a reconstruction figure, example slices.

The metrics are :class:`kronify.mri.metrics.MetricsAccumulator`'s (fastMRI SSIM/PSNR/NMSE on magnitudes with the
volume max as data range, phase error, LPIPS when its weights are on disk), computed by
:meth:`kronify.mri.training.ReconModule.test_step` with the EMA weights and gathered over every process.
``mean (std)`` are over slices, like the paper's table; the per-volume CSV has fastMRI's volume metrics.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kronify.mri.figures import reconstruction_figure
from kronify.mri.complex import magnitude
from kronify.mri.metrics import MetricsAccumulator, write_csv
from kronify.mri.training import reconstruct

__all__ = [
    "METRICS_KEYS",
    "example_indices",
    "machine_description",
    "reconstruct_examples",
    "write_json",
    "write_results",
    "zero_filled_metrics",
]

#: The keys every metrics.json has (others may follow).
METRICS_KEYS = ("model", "kron_n", "acceleration", "params", "gflops", "ssim_mean", "ssim_std", "psnr_mean",
                "psnr_std", "nmse_mean", "phase_error_mean", "lpips_mean", "lpips_std", "train_seconds", "steps")


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
    acc = MetricsAccumulator(lpips="auto")
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


def write_results(
    out_dir: str | os.PathLike,
    info: Mapping[str, Any],
    metrics: MetricsAccumulator,
    examples: Sequence[Mapping[str, Any]] = (),
    *,
    zero_filled: MetricsAccumulator | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Write ``metrics.json`` (``info`` + the summary), ``per_volume.csv``, ``per_slice.csv``, ``history.json``,
    ``examples.npz`` and ``reconstruction.png`` into ``out_dir``; returns the metrics.json content."""
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
    write_json(out_dir / "metrics.json", result)
    write_csv(metrics.volume_rows(), out_dir / "per_volume.csv")
    write_csv(metrics.slice_rows(), out_dir / "per_slice.csv")
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
        label = f"{info.get('model')} ({info.get('acceleration')}x)"
        reconstruction_figure(
            out_dir / "reconstruction.png", _magnitude(first["zero_filled"]), _magnitude(first["output"]),
            _magnitude(first["target"]),
            title=f"{label}: {first['fname']} slice {first['slice_num']}  |  test SSIM {result['ssim_mean']:.3f}, "
                  f"PSNR {result['psnr_mean']:.2f} dB",
            labels={"output": str(info.get("model"))},
        )
    return result
