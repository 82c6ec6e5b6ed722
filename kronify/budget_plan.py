"""`convert(model, budget=0.5)`: turn a parameter budget into per-layer settings (n, terms or dense).

The choice is written as exact-name overrides of the config, so the rest of `convert` (and `load`, and a
later `convert(dense_model, report.config)`) sees ordinary per-layer settings.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from kronify.budget import allocate, layer_options, within
from kronify.calibration import CalibrationLayer, collect, read_batches
from kronify.calibration.config import CalibrationConfig
from kronify.config import KronConfig
from kronify.kron_fit import damped_cholesky, weight_matrix
from kronify.layer_kinds import weight_names
from kronify.parametrization import own_kron_parametrizations
from kronify.plan import Selector, find_candidates, param_owners, target_for
from kronify.report import count_params

__all__ = ["budget_config"]


def _whitened(layer: CalibrationLayer, cfg: CalibrationConfig) -> list[Tensor] | None:
    """Each weight of `layer` as W2·L (L = chol of its input second moment), or None without usable inputs."""
    if layer.skip or layer.fit[layer.views[0].sources[0]].empty:
        return None
    out = []
    for dense, view in zip(layer.dense, layer.views):
        parts = []
        for c, w in enumerate(dense.detach().chunk(len(view.sources))):
            W = weight_matrix(w, view.transposed)
            if W.shape[1] > cfg.max_dim:
                return None
            C, _ = layer.fit[view.sources[c]].metric(view.kernel, False, view.taps_are_outputs)
            parts.append(W @ damped_cholesky(C.to(W.device), cfg.damping))
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return out


def budget_config(model: nn.Module, config: KronConfig, batches: Any) -> KronConfig:
    """The config with `budget` replaced by exact per-layer overrides that keep `config.budget` of the
    model's parameters. Layers the user excluded or cannot convert stay as they are (their parameters count)."""
    if any(v is not None for v in config.overrides.values()):
        raise ValueError("budget: the budget chooses n and terms per layer; overrides may only keep layers dense "
                         "(None) when a budget is given")
    selector = Selector(config)
    defaults = {"n": config.n, "terms": config.terms, "algebra": config.algebra}
    chosen: list[tuple[str, nn.Module, list]] = []
    owners = param_owners(model)
    for c in find_candidates(model, config.embeddings is not False):
        settings, _ = selector.select(c.paths, c.module, defaults)
        if settings is None or own_kron_parametrizations(c.module):
            continue
        targets = [target_for(c.module, name, chunks, 1, owners)[0]
                   for name, chunks in weight_names(c.module, config.embeddings is not False)]
        if all(t is not None for t in targets):
            chosen.append((c.name, c.module, targets))
    total = count_params(model)
    whitened: dict[str, list[Tensor] | None] = {}
    if batches is not None:
        cfg = config.calibration or CalibrationConfig()
        layers = [CalibrationLayer(name, m, [(t.owner, t.tensor, t.chunks) for t in ts],
                                   [t.owner._parameters[t.tensor].detach() for t in ts]) for name, m, ts in chosen]
        collect(model, layers, read_batches(batches, cfg), replace(cfg, holdout=0.0))
        whitened = {layer.name: _whitened(layer, cfg) for layer in layers}
    options = []
    for name, _, ts in chosen:
        mats = whitened.get(name) or [t.owner._parameters[t.tensor] for t in ts]
        options.append(layer_options(name, [(t.shape, t.chunks, m) for t, m in zip(ts, mats)]))
    fixed = total - sum(o.dense for o in options)
    choice = allocate(options, round(config.budget * total), fixed)
    overrides = dict(config.overrides)
    for name, (n, terms) in choice.items():
        overrides["re:" + re.escape(name)] = None if n is None else {"n": n, "terms": terms, "algebra": "learned"}
    kept = fixed + sum(next(o[0] for o in opts.options if o[2:] == choice[opts.name]) for opts in options)
    if not within(kept, round(config.budget * total)):
        warnings.warn(f"budget: the layers' options allow {kept / total:.4f} of the parameters at best, not "
                      f"{config.budget} ± 1 % (too few or too coarse layers)", UserWarning, stacklevel=3)
    return replace(config, budget=None, overrides=overrides, embeddings=config.embeddings is not False)
