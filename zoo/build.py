"""The model of one run, for kronify.mri.experiments: the preset's zoo model of a family, dense or converted.

The recipes hand :func:`build_run_model` to :func:`kronify.mri.experiments.run.train_run` (kronify.mri never
imports zoo: recipes -> zoo -> kronify.mri -> kronify). A new model is its zoo file plus one registry line; a
preset then names it in a :class:`~kronify.mri.experiments.presets.ModelSpec`.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

import kronify
from kronify.mri.experiments.compress import CompressSettings, ZooModels, load_compressed
from kronify.mri.experiments.presets import Preset
from kronify.mri.experiments.run import RunSpec
from kronify.mri.experiments.run_folder import RunRecord
from kronify.mri.experiments.setup import check_variant
from kronify.mri.training.wrappers import ZeroFilledStart
from zoo.counting import count_flops, count_params
from zoo.registry import create, create_kron, kron_settings, variant_name

__all__ = ["build_model", "build_run_model", "compress_models", "model_cost", "rebuild_run_model"]


def build_model(family: str, preset: Preset, kron_n: int, algebra: str) -> nn.Module:
    """The preset's zoo model for ``family``, converted with ``kronify.convert`` when ``kron_n`` >= 2, wrapped in
    :class:`~kronify.mri.training.wrappers.ZeroFilledStart` when the preset says so."""
    check_variant(family, preset, kron_n, algebra)
    spec = preset.model(family)
    if kron_n == 0:
        model = create(spec.zoo_name, **spec.overrides)
    else:
        model, _ = create_kron(spec.zoo_name, n=kron_n, algebra=algebra, **spec.overrides)
    return ZeroFilledStart(model, correction=spec.correction, gain_init=spec.start_gain) \
        if preset.zero_filled_start else model


def model_cost(model: nn.Module, size: int) -> tuple[int, float]:
    """(parameters, GFLOPs of one 2×size×size slice); a Kronecker model is counted after ``kronify.merge``."""
    params = count_params(model)
    network = model.model if isinstance(model, ZeroFilledStart) else model
    return params, count_flops(kronify.merge(copy.deepcopy(network)), size) / 1e9


def build_run_model(spec: RunSpec, preset: Preset) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``spec`` and its cost as recorded in metrics.json (``params``, ``gflops``, ``gflops_size``)."""
    model = build_model(spec.family, preset, spec.kron_n, spec.algebra)
    params, gflops = model_cost(model, preset.crop)
    return model, {"params": params, "gflops": gflops, "gflops_size": preset.crop}


def compress_models() -> ZooModels:
    """The zoo's side of :func:`kronify.mri.experiments.compress.compress_run`: dense models, their Kronecker
    settings, their cost, and the name of a compressed run (``kron_<dense>_compressed[_budget<b>]``); plain
    functions, so that worker processes can receive them."""
    return ZooModels(dense=_dense_model, kron_settings=_kron_settings, cost=_cost, name=_compressed_name)


def _dense_model(family: str, preset: Preset) -> nn.Module:
    return build_model(family, preset, 0, "learned")


def _kron_settings(family: str, preset: Preset) -> dict[str, Any]:
    return kron_settings(preset.model(family).zoo_name)


def _cost(model: nn.Module, preset: Preset) -> dict[str, Any]:
    params, gflops = model_cost(model, preset.crop)
    return {"params": params, "gflops": gflops, "gflops_size": preset.crop}


def _compressed_name(family: str, preset: Preset, settings: CompressSettings) -> str:
    base = variant_name(preset.model(family).zoo_name, settings.kron_n)
    return f"{base}_compressed" + (f"_budget{settings.budget:g}" if settings.budget is not None else "")


def rebuild_run_model(run: RunRecord, preset: Preset) -> nn.Module:
    """The model of a finished run, ready for its EMA weights: built from its metrics.json, or for a compressed
    run (``recipes/compress.py``), the dense model converted as its ``kron/`` save records."""
    info = run.info
    if info.get("kron_save"):
        return load_compressed(run, build_model(info["family"], preset, 0, "learned"))
    return build_model(info["family"], preset, int(info["kron_n"]), info.get("algebra") or "learned")
