"""Reconstruction metrics the fastMRI way: SSIM, PSNR, NMSE (``fastmri.evaluate``), phase error and LPIPS.

All metrics compare magnitude images in original units. The data range comes from the target that is
scored, never from a file's ``max`` attribute (which belongs to the crop the file was built with), and the
protocol (:mod:`kronify.mri.protocol`) decides which target:

- ``paper``: each slice is scored on its own with data range = that slice's target max (taken here from the
  target itself), and the summary is mean (std) over slices, as the official HyperKron code does.
- ``fastmri``: fastMRI's volume metrics with data range = the scored target volume's max (``max_value``,
  which :class:`kronify.mri.data.datasets.SingleCoilSliceDataset` computes from the scored slices; checked here
  against the targets received), and the summary is mean (std) over volumes, as ``fastmri.evaluate`` does.

- Per slice: ``fastmri.evaluate.ssim/psnr/nmse`` on the one-slice volume ``x[None]``.
- Per volume: identical to ``fastmri.evaluate`` on the stacked volume. SSIM is fastMRI's mean of slice SSIMs;
  PSNR and NMSE pool squared errors over the whole volume. They are recomputed from per-slice sums
  (squared error, squared target norm, pixel count, target max), so no image has to be kept or gathered
  across processes.
- Phase error: mean |wrapped phase difference| in radians over pixels whose target magnitude exceeds 10% of
  the slice's max target magnitude; per volume it is the mean over its slices.
- LPIPS: see :mod:`kronify.mri.lpips`; None everywhere when its weights are not available.

:class:`MetricsAccumulator` collects batches, deduplicates slices by ``(fname, slice_num)`` (DistributedSampler
pads by repeating samples) and merges across processes via :meth:`MetricsAccumulator.state` /
:meth:`MetricsAccumulator.merge`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from fastmri import evaluate as fm_eval
from torch import Tensor

from kronify.mri.complex import magnitude
from kronify.mri.lpips import LPIPSMetric
from kronify.mri.protocol import Protocol, get_protocol

__all__ = [
    "METRICS",
    "TABLE_METRICS",
    "MetricsAccumulator",
    "default_lpips",
    "phase_error",
    "slice_metrics",
    "volume_metrics",
    "write_csv",
]

METRICS = ("ssim", "psnr", "nmse", "phase_error", "lpips")
#: How the result tables show the metrics, in column order: metric -> (column label, decimals). The tables'
#: columns, cells and JSON numbers are generated from it (kronify.mri.experiments.tables).
TABLE_METRICS: dict[str, tuple[str, int]] = {"ssim": ("SSIM", 3), "psnr": ("PSNR", 2), "lpips": ("LPIPS", 3),
                                             "phase_error": ("Phase error rad", 3)}


def phase_error(output: Tensor | np.ndarray, target: Tensor | np.ndarray, threshold: float = 0.1) -> float:
    """Mean |angle(output · conj(target))| in [0, π] radians over pixels with |target| > threshold · max|target|.

    ``output`` and ``target`` are one slice, channel-first complex (2, H, W). NaN when no pixel qualifies
    (an all-zero target).
    """
    out = np.asarray(output.detach().cpu() if isinstance(output, Tensor) else output, dtype=np.float64)
    tgt = np.asarray(target.detach().cpu() if isinstance(target, Tensor) else target, dtype=np.float64)
    if out.shape != tgt.shape or out.ndim != 3 or out.shape[0] != 2:
        raise ValueError(f"expected two (2, H, W) complex slices, got {out.shape} and {tgt.shape}")
    oc, tc = out[0] + 1j * out[1], tgt[0] + 1j * tgt[1]
    mag = np.abs(tc)
    keep = mag > threshold * mag.max()
    if not keep.any():
        return float("nan")
    return float(np.abs(np.angle(oc[keep] * np.conj(tc[keep]))).mean())


def _scalar(x: Any) -> float:
    return float(np.asarray(x).reshape(-1)[0])  # fastmri's ssim returns shape (1,)


def slice_metrics(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> dict[str, float]:
    """fastMRI SSIM/PSNR/NMSE of one (H, W) magnitude slice with ``data_range = maxval`` (default: ``gt.max()``)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    maxval = float(gt.max()) if maxval is None else maxval
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"expected two (H, W) slices, got {gt.shape} and {pred.shape}")
    return {
        "ssim": _scalar(fm_eval.ssim(gt[None], pred[None], maxval)),
        "psnr": _scalar(fm_eval.psnr(gt[None], pred[None], maxval)),
        "nmse": _scalar(fm_eval.nmse(gt[None], pred[None])),
    }


def volume_metrics(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> dict[str, float]:
    """fastMRI SSIM/PSNR/NMSE of a (slices, H, W) magnitude volume, data range ``maxval`` (default ``gt.max()``,
    as ``fastmri.evaluate`` does)."""
    maxval = float(np.max(gt)) if maxval is None else maxval
    return {
        "ssim": _scalar(fm_eval.ssim(gt, pred, maxval)),
        "psnr": _scalar(fm_eval.psnr(gt, pred, maxval)),
        "nmse": _scalar(fm_eval.nmse(gt, pred)),
    }


@lru_cache(maxsize=1)
def default_lpips() -> LPIPSMetric:
    """The process-wide LPIPS(AlexNet) metric built from local weights (unavailable when they are absent)."""
    return LPIPSMetric()


def _as_list(x: Any, n: int, name: str, broadcast: bool = False) -> list:
    """One value per batch item; a scalar is repeated when ``broadcast``."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().reshape(-1).tolist()
    elif isinstance(x, (str, bytes)) or not isinstance(x, Iterable):
        x = [x]
    x = list(x)
    if broadcast and len(x) == 1:
        x = x * n
    if len(x) != n:
        raise ValueError(f"{name} has {len(x)} entries for a batch of {n}")
    return x


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


class MetricsAccumulator:
    """Collects per-slice metrics over batches; reports per slice, per volume and mean (std) over slices.

    Args:
        lpips: an :class:`LPIPSMetric`, ``"auto"`` (default: the cached :func:`default_lpips`, available only when
            the AlexNet weights are on disk) or None (LPIPS not computed; reported as None).
        phase_threshold: fraction of the slice's max target magnitude above which pixels count for phase error.
        protocol: ``"fastmri"`` (volume metrics, data range = the scored volume's max) or ``"paper"``
            (per-slice metrics, data range = the slice's target max); see the module docstring. None (default):
            the protocol of the first rows merged in, else ``"fastmri"``. Every row records its protocol, and
            rows of two protocols never mix.
    """

    def __init__(self, lpips: LPIPSMetric | str | None = "auto", phase_threshold: float = 0.1,
                 protocol: str | Protocol | None = None) -> None:
        self._protocol = None if protocol is None else get_protocol(protocol)
        if lpips == "auto":
            lpips = default_lpips()
        elif lpips is not None and not isinstance(lpips, LPIPSMetric):
            raise TypeError(f"lpips must be an LPIPSMetric, 'auto' or None, got {lpips!r}")
        self.lpips = lpips
        self.phase_threshold = phase_threshold
        self._rows: dict[tuple[str, int], dict[str, Any]] = {}

    @property
    def protocol(self) -> Protocol:
        """The protocol the rows are scored and summarised under."""
        return self._protocol or get_protocol("fastmri")

    @property
    def lpips_message(self) -> str | None:
        """Why LPIPS is None (missing weights, or not requested); None when it is computed."""
        if self.lpips is None:
            return "LPIPS not requested (MetricsAccumulator(lpips=None))."
        return self.lpips.message

    @torch.no_grad()
    def update(
        self,
        output: Tensor,
        target: Tensor,
        fname: Sequence[str] | str,
        slice_num: Tensor | Sequence[int] | int,
        max_value: Tensor | Sequence[float] | float | None,
        scale: Tensor | Sequence[float] | float | None = None,
    ) -> None:
        """Add one batch.

        ``output``/``target``: (B, 2, H, W) complex images. In original units when ``scale`` is None; otherwise
        normalized (as the network sees them) and multiplied here by ``scale`` (B,) to return to original units.
        ``fname``, ``slice_num``: one per item; ``max_value`` (the data range: the scored target volume's max under
        ``fastmri``; under ``paper`` the slice's own target max is used and ``max_value`` is not needed) and
        ``scale``: one per item or a single value for the whole batch.
        """
        if self._protocol is None:
            self._protocol = self.protocol
        if output.shape != target.shape or output.dim() != 4 or output.shape[1] != 2:
            raise ValueError(f"expected output and target shaped (B, 2, H, W), got {tuple(output.shape)} "
                             f"and {tuple(target.shape)}")
        n = output.shape[0]
        names = [str(f) for f in _as_list(fname, n, "fname")]
        slices = [int(s) for s in _as_list(slice_num, n, "slice_num")]
        maxvals = [float(m) for m in _as_list(max_value, n, "max_value", broadcast=True)] \
            if max_value is not None else [float("nan")] * n
        output, target = output.detach().float(), target.detach().float()
        if scale is not None:
            s = torch.as_tensor(_as_list(scale, n, "scale", broadcast=True), dtype=output.dtype, device=output.device)
            output, target = output * s.view(-1, 1, 1, 1), target * s.view(-1, 1, 1, 1)
        out_mag, tgt_mag = magnitude(output), magnitude(target)
        if self.protocol.metric_scope == "slice":
            maxvals = [float(m) for m in tgt_mag.flatten(1).amax(1).cpu()]
        lp = None
        if self.lpips is not None:
            lp = self.lpips(out_mag, tgt_mag, torch.tensor(maxvals, device=out_mag.device))
            lp = lp.cpu().tolist() if lp is not None else None
        out_np, tgt_np = out_mag.cpu().numpy(), tgt_mag.cpu().numpy()
        out_c, tgt_c = output.cpu(), target.cpu()
        for i in range(n):
            gt, pred = tgt_np[i], out_np[i]
            target_max = float(gt.max())
            data_range = target_max if self.protocol.metric_scope == "slice" else maxvals[i]
            row = {"fname": names[i], "slice_num": slices[i], "protocol": self.protocol.name,
                   "max_value": data_range, "target_max": target_max}
            row.update(slice_metrics(gt, pred, data_range))
            row["phase_error"] = phase_error(out_c[i], tgt_c[i], self.phase_threshold)
            row["lpips"] = lp[i] if lp is not None else None
            # sufficient statistics for fastMRI's volume PSNR/NMSE
            row["sse"] = float(np.sum((gt.astype(np.float64) - pred) ** 2))
            row["gt_sq"] = float(np.sum(gt.astype(np.float64) ** 2))
            row["n_pixels"] = int(gt.size)
            self._rows.setdefault((names[i], slices[i]), row)

    def state(self) -> list[dict[str, Any]]:
        """Picklable per-slice rows (e.g. for ``torch.distributed.all_gather_object``)."""
        return [dict(r) for r in self._rows.values()]

    def merge(self, other: MetricsAccumulator | Iterable[dict[str, Any]]) -> MetricsAccumulator:
        """Add rows from another accumulator or :meth:`state`; a slice already present is kept once.

        Rows scored under another protocol are an error (an accumulator without an explicit protocol and
        without rows adopts theirs)."""
        rows = other.state() if isinstance(other, MetricsAccumulator) else list(other)
        for r in rows:
            name = r.get("protocol", "fastmri")
            if self._protocol is None and not self._rows:
                self._protocol = get_protocol(name)
            if name != self.protocol.name:
                raise ValueError(f"cannot merge rows scored under the {name!r} protocol into {self.protocol.name!r} "
                                 f"rows ({r['fname']} slice {r['slice_num']})")
            self._rows.setdefault((r["fname"], int(r["slice_num"])), dict(r))
        return self

    def reset(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)

    def slice_rows(self) -> list[dict[str, Any]]:
        """One dict per slice (sorted by fname, slice_num), ready for :func:`write_csv`."""
        return [dict(self._rows[k]) for k in sorted(self._rows)]

    def volume_rows(self) -> list[dict[str, Any]]:
        """One dict per volume: fastMRI's volume SSIM/PSNR/NMSE; mean phase error and LPIPS over its slices.

        The data range is the max over the volume's scored target slices. Under ``fastmri`` the slices' SSIM
        was computed with the ``max_value`` passed to :meth:`update`; a ``max_value`` that is not that max
        (e.g. a file's stale ``max`` attribute, or a per-slice one) is an error naming the volume.
        """
        by_vol: dict[str, list[dict[str, Any]]] = {}
        for row in self.slice_rows():
            by_vol.setdefault(row["fname"], []).append(row)
        out = []
        for fname, rows in by_vol.items():
            maxval = max(r["target_max"] for r in rows)
            if self.protocol.metric_scope == "volume":
                given = {r["max_value"] for r in rows}
                if any(not math.isclose(g, maxval, rel_tol=1e-4) for g in given):
                    raise ValueError(
                        f"volume {fname}: the data range passed as max_value ({sorted(given)[:3]}) is not the max of "
                        f"its scored target slices ({maxval:.6g}); pass the evaluated target volume's max (fastmri "
                        "protocol) or score with protocol='paper' (per-slice data range)")
            sse = sum(r["sse"] for r in rows)
            mse = sse / sum(r["n_pixels"] for r in rows)
            out.append({
                "fname": fname,
                "n_slices": len(rows),
                "max_value": maxval,
                "ssim": float(np.mean([r["ssim"] for r in rows])),
                "psnr": float(10 * np.log10(maxval**2 / mse)) if mse > 0 else float("inf"),
                "nmse": sse / sum(r["gt_sq"] for r in rows),
                "phase_error": _mean_std([r["phase_error"] for r in rows])[0],
                "lpips": _mean_std([r["lpips"] for r in rows])[0],
            })
        return out

    def summary(self) -> dict[str, Any]:
        """The table's summary: ``<metric>_mean`` and ``<metric>_std`` (population std) over slices (``paper``)
        or over volumes (``fastmri``), plus ``protocol``, ``metrics_over`` ("slices"/"volumes"), ``n_slices``
        and ``n_volumes``. LPIPS entries are None when LPIPS is unavailable.
        """
        slices = self.slice_rows()  # sorted: the result does not depend on arrival or merge order
        rows = slices if self.protocol.metric_scope == "slice" else self.volume_rows()
        out: dict[str, Any] = {"protocol": self.protocol.name,
                               "metrics_over": "slices" if self.protocol.metric_scope == "slice" else "volumes",
                               "n_slices": len(slices), "n_volumes": len({r["fname"] for r in slices})}
        for m in METRICS:
            out[f"{m}_mean"], out[f"{m}_std"] = _mean_std([r[m] for r in rows])
        return out


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write metric rows (from :meth:`MetricsAccumulator.slice_rows`/``volume_rows``) to a CSV file."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
