"""kronify.save / kronify.load: a converted model as one file (conversion settings + weights).

The file is a `torch.save` archive of a dict: "kronify" holds a JSON string
{"format": 1, "kronify_version": ..., "layers": {name: {"n", "terms", "algebra"}}} and "state_dict"
the model's state dict. It is read back with `torch.load(weights_only=True)`, so loading executes
no pickled code. `load` rebuilds the Kronecker skeleton on a freshly built dense model (no warm
start) and then loads the weights strictly.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from importlib import metadata

import torch
from torch import nn

from kronify.convert import _convert, find_candidates, is_kron, restore

__all__ = ["save", "load"]

FORMAT = 1


def _version() -> str:
    try:
        return metadata.version("kronify")
    except metadata.PackageNotFoundError:
        return "unknown"


def conversion_config(model: nn.Module) -> dict:
    """{layer name: kron_config()} for every Kron layer of `model` (first path of shared layers)."""
    return {c.name: c.module.kron_config() for c in find_candidates(model) if is_kron(c.module)}


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the conversion settings and the state dict of `model` to the single file `path`.

    Written to a temporary file in the same directory, then moved over `path` with os.replace,
    so an interrupted save never leaves a truncated file behind.
    """
    layers = conversion_config(model)
    if not layers:
        raise ValueError("save: the model has no Kronecker layers (convert it first, or use torch.save)")
    meta = {"format": FORMAT, "kronify_version": _version(), "layers": layers}
    payload = {"kronify": json.dumps(meta), "state_dict": model.state_dict()}
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """(settings dict, state dict) stored by `save`."""
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "kronify" not in payload or "state_dict" not in payload:
        raise ValueError(f"{os.fspath(path)!r} is not a kronify.save file")
    meta = json.loads(payload["kronify"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r}: unsupported kronify file format {meta.get('format')!r}")
    return meta, payload["state_dict"]


def load(base_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Convert `base_model` (the dense architecture) as recorded in `path`, then load its weights strictly.

    Returns `base_model`, converted in place. On any error (a recorded layer missing or not
    convertible, missing / unexpected / mis-shaped keys) `base_model` is left unchanged.
    """
    meta, state = read_config(path)
    layers = meta["layers"]
    exact = {f"re:{re.escape(name)}": cfg for name, cfg in layers.items()}
    try:
        with warnings.catch_warnings():  # unmatched names are reported below as an error, not a warning
            warnings.simplefilter("ignore", UserWarning)
            _, swaps = _convert(base_model, 2, terms=None, algebra="learned", warm_start=False, include=list(exact),
                                exclude=None, overrides=exact, strict=True, inplace=True, example_inputs=None)
    except ValueError as e:
        raise ValueError(f"load: cannot rebuild the converted layers of {os.fspath(path)!r} on this model: {e}") from e
    converted = {c.name for c in find_candidates(base_model) if is_kron(c.module)}
    try:
        missing_layers = sorted(set(layers) - converted)
        if missing_layers:
            raise ValueError(f"load: layers recorded in the file not found in the model: {missing_layers}")
        own = base_model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                     "shape mismatch for " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                       for k in shapes) if shapes else ""]
            raise ValueError(f"load: state dict in {os.fspath(path)!r} does not fit the model: "
                             + "; ".join(p for p in parts if p))
        base_model.load_state_dict(state, strict=True)
    except BaseException:
        restore(base_model, swaps)
        raise
    return base_model
