"""The table of layer kinds is the one place to teach kronify a new kind of layer."""

from __future__ import annotations

import copy

import torch
from torch import nn

import kronify
from kronify import layer_kinds
from kronify.layer_kinds import KINDS, InputView, LayerKind, kind_of, weight_names


class Projection(nn.Module):
    """A layer kronify does not know: its weight is called `kernel` and stored (in, out)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


PROJECTION = LayerKind("projection", lambda m: isinstance(m, Projection), lambda m: [("kernel", 1)],
                       lambda m, tensor: ("d_in", "d_out"),
                       lambda m, tensor, chunks: InputView("linear", (0,), transposed=True),
                       bias=lambda m, tensor: None)


def _model() -> nn.Module:
    return nn.Sequential(Projection(8, 16), nn.ReLU(), Projection(16, 6), nn.Linear(6, 4))


def test_unknown_layer_is_not_a_candidate():
    model = _model()
    assert kind_of(model[0]) is None and weight_names(model[0]) == []
    report = kronify.convert(model, n=2)
    assert report.converted == ["3"]


def test_one_table_entry_adds_a_kind_to_convert_calibration_and_budget(monkeypatch):
    monkeypatch.setattr(layer_kinds, "KINDS", [PROJECTION, *KINDS])
    torch.manual_seed(0)
    dense = _model()
    x = torch.randn(64, 8)
    # convert: the new kind is planned (its dims named in messages), warm-started and reported
    report = kronify.convert(_model(), n=4, strict=False)
    assert report.converted == ["0"]
    assert "d_out=6 not divisible by n=4" in report.skipped["2"]
    # calibration reads the inputs through the kind's InputView and beats the weight-only fit
    batches = [torch.randn(32, 8) for _ in range(8)]
    plain = kronify.convert(_copy(dense), n=2, terms=1, warm_start=True).model
    calibrated = kronify.convert(_copy(dense), n=2, terms=1, warm_start=True, calibration=batches)
    assert calibrated.rows[0].fit is not None and not calibrated.rows[0].fit.startswith("weight-only")
    with torch.no_grad():
        target = dense(x)
        assert (calibrated.model(x) - target).norm() < (plain(x) - target).norm()
    # the budget counts its parameters among the choices
    budget = kronify.convert(_copy(dense), budget=0.6)
    assert {"re:0", "re:2", "re:3"} <= set(budget.config.overrides)


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
