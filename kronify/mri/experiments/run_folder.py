"""A run folder, read and written here only: ``metrics.json`` (the run's description and test scores),
``per_volume.csv``, ``per_slice.csv``, ``zero_filled_per_volume.csv``, ``history.json`` (validation after every
check), ``examples.npz`` (example slices), ``reconstruction.png`` and ``checkpoints/last.ckpt``.

- :func:`write_run` writes a tested run (training, :mod:`kronify.mri.experiments.run`, or an evaluation,
  :func:`kronify.mri.experiments.evaluate.evaluate_run`).
- :class:`RunRecord` reads one back: :meth:`RunRecord.read` a finished run (tables, studies),
  :meth:`RunRecord.open` a run to evaluate (it must describe its model and hold a checkpoint). Its properties and
  methods are typed views of metrics.json (``model``, ``protocol``, ``mean(metric)``, ...), of the CSVs
  (``per_volume(metric)``), of ``history.json``, ``examples.npz`` and of the EMA weights. Any metrics.json written
  since the pipeline began reads (missing keys read as None, the protocol as ``fastmri``).

Reading a run never writes into it. Every problem is a :class:`~kronify.mri.errors.RunError` whose message names
the file.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kronify.mri.complex import magnitude
from kronify.mri.errors import RunError
from kronify.mri.experiments.figures import reconstruction_figure
from kronify.mri.experiments.statistics import paired_comparison
from kronify.mri.metrics import MetricsAccumulator, write_csv
from kronify.mri.training.checkpoint import LAST

__all__ = ["EMA_PREFIX", "METRICS_KEYS", "REQUIRED_KEYS", "RunRecord", "per_volume", "versus_zero_filled",
           "volume_means", "write_json", "write_run"]

METRICS, PER_VOLUME, PER_SLICE = "metrics.json", "per_volume.csv", "per_slice.csv"
ZERO_FILLED_PER_VOLUME, HISTORY, EXAMPLES, FIGURE = ("zero_filled_per_volume.csv", "history.json", "examples.npz",
                                                     "reconstruction.png")
#: The keys every metrics.json has (others may follow).
METRICS_KEYS = ("model", "kron_n", "acceleration", "params", "gflops", "ssim_mean", "ssim_std", "psnr_mean",
                "psnr_std", "nmse_mean", "phase_error_mean", "lpips_mean", "lpips_std", "train_seconds", "steps")
#: The zero-filled baseline's scores kept in metrics.json's ``zero_filled`` block.
ZERO_FILLED_KEYS = ("ssim_mean", "ssim_std", "psnr_mean", "psnr_std", "nmse_mean", "phase_error_mean", "lpips_mean",
                    "lpips_std")
#: Keys of a run's metrics.json needed to rebuild its model and data.
REQUIRED_KEYS = ("model", "family", "kron_n", "acceleration", "preset")
#: Where :class:`kronify.mri.training.module.ReconModule` keeps the EMA copy in its state dict.
EMA_PREFIX = "ema.module."


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


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1) + "\n")
    os.replace(tmp, path)



def volume_means(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[str, float]:
    """``{volume: mean of metric over the volume's rows}`` (one row per volume gives its value unchanged)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        values.setdefault(row["fname"], []).append(float(row[metric]))
    return {name: float(np.mean(v)) for name, v in values.items()}


def per_volume(metrics: MetricsAccumulator, metric: str) -> dict[str, float]:
    """``{volume: metric}`` at the accumulator's scope: fastMRI's volume metric (``fastmri``), or the mean of
    the volume's slice metrics (``paper``, which scores slices), as :meth:`RunRecord.per_volume` reads it back."""
    by_slice = metrics.protocol.metric_scope == "slice"
    return volume_means(metrics.slice_rows() if by_slice else metrics.volume_rows(), metric)


def versus_zero_filled(metrics: MetricsAccumulator, zero_filled: MetricsAccumulator) -> dict[str, dict[str, Any]]:
    """Model minus zero-filling, paired over the scored volumes, for PSNR and SSIM (mean difference, 95 % t and
    bootstrap CIs, Wilcoxon p: :func:`kronify.mri.experiments.statistics.paired_comparison`); does the model beat
    it?"""
    return {m: paired_comparison(per_volume(metrics, m), per_volume(zero_filled, m)).as_dict() for m in ("psnr", "ssim")}


def _magnitude(x: np.ndarray) -> np.ndarray:
    return magnitude(torch.as_tensor(x)).numpy()


def write_run(
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
        result["zero_filled"] = {k: zf[k] for k in ZERO_FILLED_KEYS}
        result["vs_zero_filled"] = versus_zero_filled(metrics, zero_filled)
        write_csv(zero_filled.volume_rows(), out_dir / ZERO_FILLED_PER_VOLUME)
    write_json(out_dir / METRICS, result)
    write_csv(metrics.volume_rows(), out_dir / PER_VOLUME)
    write_csv(metrics.slice_rows(), out_dir / PER_SLICE)
    if history is not None:
        write_json(out_dir / HISTORY, list(history))
    if examples:
        np.savez_compressed(
            out_dir / EXAMPLES,
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
            out_dir / FIGURE, _magnitude(first["zero_filled"]), _magnitude(first["output"]),
            _magnitude(first["target"]),
            title=f"{label}: {first['fname']} slice {first['slice_num']}  |  {'' if scored else 'test '}SSIM "
                  f"{result['ssim_mean']:.3f}, PSNR {result['psnr_mean']:.2f} dB{scored}",
            labels={"output": str(info.get("model"))},
        )
    return result


@dataclass(frozen=True)
class RunRecord:
    """One run folder: ``path``, ``info`` (its metrics.json) and ``checkpoint`` (``checkpoints/last.ckpt``, None
    when the run was read without one)."""

    path: Path
    info: Mapping[str, Any]
    checkpoint: Path | None = None

    @staticmethod
    def is_finished(run_dir: str | os.PathLike) -> bool:
        """Whether ``run_dir`` holds a finished run (its metrics.json is written last)."""
        return (Path(run_dir) / METRICS).is_file()

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> RunRecord:
        """A finished run's metrics.json (a missing one is a ``FileNotFoundError``: the run has not finished)."""
        path = Path(run_dir)
        if not cls.is_finished(path):
            raise FileNotFoundError(f"{path} holds no finished run (no metrics.json)")
        return cls(path, json.loads((path / METRICS).read_text()))

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> RunRecord:
        """Check ``run_dir`` holds a finished run (metrics.json with the model's description, a checkpoint)."""
        path = Path(run_dir).expanduser()
        if not path.is_dir():
            raise RunError(f"run folder {str(path)!r} does not exist or is not a folder")
        metrics = path / METRICS
        if not metrics.is_file():
            inner = sorted(p.parent.name for p in path.glob(f"*/{METRICS}"))
            hint = (f"; it holds several runs, pass one of them: {', '.join(str(path / n) for n in inner)}"
                    if inner else "; a recipe writes it when its run has finished")
            raise RunError(f"run folder {path} has no metrics.json{hint}")
        try:
            info = json.loads(metrics.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"cannot read {metrics}: {err}") from err
        if not isinstance(info, dict):
            raise RunError(f"{metrics} is not a recipe's metrics.json (not a JSON object)")
        missing = [key for key in REQUIRED_KEYS if key not in info]
        if missing:
            raise RunError(f"{metrics} lacks {missing}: not a recipe's metrics.json")
        checkpoint = path / "checkpoints" / LAST
        if not checkpoint.is_file():
            raise RunError(f"run folder {path} has no checkpoint {checkpoint.relative_to(path)}")
        return cls(path.resolve(), info, checkpoint.resolve())

    # --- metrics.json -------------------------------------------------------------------------------------------
    @property
    def model(self) -> str | None:
        """The run's model name (``zoo.variant_name``)."""
        return self.info.get("model")

    @property
    def protocol(self) -> str:
        """The protocol the run was trained and tested under (runs from before protocols: ``fastmri``, whose
        per-file test masks and per-volume data range they used)."""
        return str(self.info.get("protocol") or "fastmri")

    @property
    def by_slice(self) -> bool:
        """Whether the run scores slices (the paper protocol) rather than volumes."""
        return self.info.get("metrics_over") == "slices"

    @property
    def data_root(self) -> Path | None:
        """The data folder the run was trained on (None for runs that did not record it)."""
        root = self.info.get("data_root")
        return Path(root) if root else None

    @property
    def test_files(self) -> list[str]:
        """The run's test volumes (file names)."""
        files = self.info.get("test_files")
        if not files:
            raise RunError(f"{self.path / METRICS} does not record the run's test volumes (a run made "
                           "before they were recorded); pass a data folder to evaluate on instead")
        return list(files)

    def mean(self, metric: str) -> float | None:
        """The test mean of ``metric`` (None when the run has none, e.g. LPIPS without its weights)."""
        return self.info.get(f"{metric}_mean")

    def std(self, metric: str) -> float | None:
        """The std of ``metric`` over the scored slices or volumes (None when not recorded)."""
        return self.info.get(f"{metric}_std")

    # --- the other files ----------------------------------------------------------------------------------------
    def per_volume(self, metric: str) -> dict[str, float]:
        """``{volume: metric}`` at the run's own scope: fastMRI's volume metrics (per_volume.csv) when the run
        scores volumes, the mean of the volume's slice metrics (per_slice.csv) when it scores slices."""
        path = self.path / (PER_SLICE if self.by_slice else PER_VOLUME)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or metric not in rows[0]:
            raise ValueError(f"{path} has no {metric!r} column (columns: {list(rows[0]) if rows else 'none'})")
        return volume_means(rows, metric)

    def history(self) -> list[dict[str, Any]]:
        """The validation history: one dict per validation (``step``, ``val_loss``, ``val_psnr``, ...)."""
        return json.loads((self.path / HISTORY).read_text())

    def examples(self) -> dict[str, np.ndarray]:
        """The example slices: ``fname``, ``slice_num``, ``zero_filled``, ``output``, ``target`` (complex (2, H, W)
        images in the data's units)."""
        with np.load(self.path / EXAMPLES) as npz:
            return {key: npz[key] for key in npz.files}

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA weights from the checkpoint (keys as in the trained model)."""
        if self.checkpoint is None:
            raise RunError(f"run folder {self.path} was read without its checkpoint; use RunRecord.open")
        try:
            ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a corrupt or foreign file
            raise RunError(f"cannot read checkpoint {self.checkpoint}: {type(err).__name__}: {err}") from err
        state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        ema = {k[len(EMA_PREFIX):]: v for k, v in (state or {}).items() if k.startswith(EMA_PREFIX)}
        if not ema:
            raise RunError(f"checkpoint {self.checkpoint} holds no EMA weights ('{EMA_PREFIX}*' in its state_dict)")
        return ema

    def load_ema_weights(self, model: nn.Module) -> nn.Module:
        """Load the EMA weights into ``model`` (built like the run's model); returns it in eval mode."""
        try:
            model.load_state_dict(self.ema_state_dict(), strict=True)
        except RuntimeError as err:
            raise RunError(f"the weights in {self.checkpoint} do not fit the rebuilt model "
                           f"{self.info['model']!r}: {err}") from err
        return model.eval()
