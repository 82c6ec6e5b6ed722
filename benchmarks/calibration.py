"""Calibration benchmark: how fast the calibrated warm start collects statistics and fits each layer.

Run from the repo root: `python -m benchmarks.calibration [--threads T]`. Measured on CPU:
- collection throughput: rows of inputs per second through `Moments.add` for typical layer inputs (a Linear's
  tokens, a Conv2d's im2col patches), and one whole collection pass of a small CNN (samples/s), against the
  plain forward of the same batches (the ratio is what the hooks add);
- fit time per layer: the weight-only fit (nearest Kronecker sum), the Kronecker-whitened closed form and ALS
  (8 sweeps) for Linear and 3x3-conv shapes at n = 2, terms = 2, from 256 to 4,608 input dims.
Writes benchmarks/results/calibration.json and calibration.md.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._common import RESULTS, machine, write_results  # noqa: E402
from kronify.calibration import CalibrationLayer, collect  # noqa: E402
from kronify.calibration.inputs import Moments  # noqa: E402
from kronify.calibration.config import CalibrationConfig  # noqa: E402
from kronify.nearest import nearest_kronecker  # noqa: E402
from kronify.kron_fit import als_fit, metric_factors, whitened_fit  # noqa: E402

# (name, out, in·kernel) of the weight as a matrix
FIT_SHAPES = [("Linear 256x256", 256, 256), ("Linear 1024x1024", 1024, 1024), ("Conv 64x64x3x3", 64, 576),
              ("Conv 256x256x3x3", 256, 2304), ("Conv 512x512x3x3", 512, 4608)]


def _seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fit_times() -> list[dict]:
    """Seconds of each fit for each shape (inputs: random anisotropic rows, 4·d of them)."""
    rows = []
    for name, m, d in FIT_SHAPES:
        g = torch.Generator().manual_seed(0)
        W = torch.randn(m, d, generator=g, dtype=torch.float64)
        X = torch.randn(4 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, d, dtype=torch.float64)
        C = X.T @ X / X.shape[0]
        A, F, _ = nearest_kronecker(W, 2, 2)
        rows.append({
            "layer": name, "input_dim": d,
            "weight_s": _seconds(lambda: nearest_kronecker(W, 2, 2)),
            "kron_s": _seconds(lambda: whitened_fit(W, 2, 2, *metric_factors(C, 2))),
            "als8_s": _seconds(lambda: als_fit(W, C, A, F, sweeps=8, tol=0.0), repeats=1),
        })
    return rows


def collection() -> dict:
    """Rows/s of Moments.add and one collection pass over a small CNN against its plain forward."""
    out = {}
    for name, d in (("tokens d=1024", 1024), ("patches d=576", 576)):
        X = torch.randn(16384, d)
        moments = Moments()
        out[f"{name} rows/s"] = X.shape[0] / _seconds(lambda: moments.add(X))
    cnn = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    batches = [torch.randn(32, 16, 32, 32) for _ in range(4)]
    layers = [CalibrationLayer(str(i), m, [(m, "weight", 1)], [m.weight.detach()])
              for i, m in enumerate(cnn) if isinstance(m, (nn.Conv2d, nn.Linear))]
    cfg = CalibrationConfig(holdout=0.0)

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                cnn(b)

    plain = _seconds(forward)
    hooked = _seconds(lambda: collect(cnn, layers, batches, cfg))
    samples = sum(len(b) for b in batches)
    out.update({"cnn forward samples/s": samples / plain, "cnn collection samples/s": samples / hooked,
                "collection / forward time": hooked / plain})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fits, coll = fit_times(), collection()
    md = ["# Calibration benchmark", "", f"Machine: {machine()}", "", "## Fit time per layer (n = 2, terms = 2)", "",
          "| layer | input dim | weight-only s | Kronecker-whitened s | ALS 8 sweeps s |", "|---|---|---|---|---|"]
    md += [f"| {r['layer']} | {r['input_dim']} | {r['weight_s']:.4f} | {r['kron_s']:.4f} | {r['als8_s']:.3f} |"
           for r in fits]
    md += ["", "## Collection", "", "| measure | value |", "|---|---|"]
    md += [f"| {k} | {v:,.1f} |" if v > 10 else f"| {k} | {v:.3f} |" for k, v in coll.items()]
    write_results(RESULTS, "calibration", {"machine": machine(), "fits": fits, "collection": coll},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
