"""CalibrationConfig: how `kronify.convert(..., calibration=batches)` fits each layer's factors to its inputs
(the `calibration` field of a KronConfig)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CALIBRATION_METHODS", "CalibrationConfig"]

CALIBRATION_METHODS = ("als", "kron", "weight")


@dataclass
class CalibrationConfig:
    """How `convert(..., calibration=batches)` fits each layer's factors to its inputs.

    method: "als" (alternating least squares on the full input second moment; the default), "kron" (the closed
    form in the Kronecker-factored metric) or "weight" (the plain nearest Kronecker sum, for comparison);
    sequential: each layer sees the outputs of the already compressed layers before it (else the dense
    model's); holdout: share of the calibration batches kept aside to choose between the calibrated and
    the weight-only fit (the better one is kept); bias_correction: fit in the centred metric and add
    (W − Ŵ)·mean(x) to the bias; damping: ridge, relative to the mean input energy, added to the metric;
    max_dim: largest input dimension (in·kernel) for which the full second moment is kept (larger layers
    use its Kronecker-factored form); max_batches: how many batches are read from the iterable.
    """

    method: str = "als"
    sequential: bool = True
    sweeps: int = 8
    holdout: float = 0.25
    bias_correction: bool = True
    damping: float = 1e-2
    max_dim: int = 4096
    max_batches: int = 64

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"CalibrationConfig: method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"CalibrationConfig: holdout must be in [0, 1), got {self.holdout!r}")
        for name in ("sweeps", "max_dim", "max_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sweeps" else 1):
                raise ValueError(f"CalibrationConfig: {name} must be a positive integer, got {value!r}")
        if not self.damping >= 0:
            raise ValueError(f"CalibrationConfig: damping must be >= 0, got {self.damping!r}")
