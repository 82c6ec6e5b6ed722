"""kronify.save / kronify.load: a converted model as one safetensors file, no pickle.

The file holds the model's state dict (Kronecker factors under torch's parametrize names,
`<layer>.parametrizations.weight.original0/1`) and, in the safetensors metadata under "kronify", a JSON
record {"format": 2, "kronify_version": ..., "config": <KronConfig or null>, "tensors": [{"owner":
module name, "tensor": name, "shape": [...], "chunks": c, "n", "terms", "algebra"[, "tied_to": the
embedding weight whose factors a tied head shares]}, ...]}. Tensors that
share memory (tied weights) are stored once each under every name, as safetensors requires. `load`
parametrizes exactly the recorded tensors of a freshly built dense model and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata

import torch
from torch import nn

from kronify.config import KronConfig
from kronify.apply import apply_plans
from kronify.plan import Plan, Target
from kronify.parametrization import kron_parametrizations
from kronify.report import LayerRow

__all__ = ["save", "load", "read_record"]

FORMAT = 2


def _version() -> str:
    try:
        return metadata.version("kronify")
    except metadata.PackageNotFoundError:
        return "unknown"


def save(model: nn.Module, path: str | os.PathLike, config: KronConfig | None = None) -> None:
    """Write `model`'s Kronecker layout and state dict to the safetensors file `path`, atomically
    (a temporary file in the same folder, then os.replace). `config`, if given, is stored with it."""
    from safetensors.torch import save_file

    tensors, first = [], {}
    for owner_name, owner, name, p in kron_parametrizations(model):
        where = f"{owner_name}.{name}" if owner_name else name
        source = first.setdefault(id(owner.parametrizations[name]), where)  # a tied head: its embedding's
        tensors.append({"owner": owner_name, "tensor": name, "shape": list(p.shape), "chunks": p.chunks, **p.config(),
                        **({"tied_to": source} if source != where else {})})
    if not tensors:
        raise ValueError("save: the model has no Kronecker layers (convert it first, or use safetensors directly)")
    record = {"format": FORMAT, "kronify_version": _version(), "tensors": tensors,
              "config": config.to_dict() if config is not None else None}
    seen: set[int] = set()
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        state[k] = v.clone().contiguous() if v.data_ptr() in seen else v.contiguous()
        seen.add(v.data_ptr())
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"kronify": json.dumps(record)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_record(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(kronify record, state dict) stored by `save`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    if "kronify" not in meta:
        raise ValueError(f"{path!r} is not a kronify.save file (no 'kronify' metadata)")
    record = json.loads(meta["kronify"])
    if record.get("format") != FORMAT:
        raise ValueError(f"{path!r}: unsupported kronify file format {record.get('format')!r}")
    return record, load_file(path)


def _plans(base: nn.Module, record: dict) -> list[Plan]:
    plans, by_name = [], {}
    for entry in record["tensors"]:
        where = f"{entry['owner']}.{entry['tensor']}" if entry["owner"] else entry["tensor"]
        try:
            owner = base.get_submodule(entry["owner"])
        except AttributeError:
            raise ValueError(f"load: layer {entry['owner']!r} recorded in the file is not in the model") from None
        t = owner._parameters.get(entry["tensor"])
        if t is None or tuple(t.shape) != tuple(entry["shape"]):
            got = "missing" if t is None else f"of shape {tuple(t.shape)}"
            raise ValueError(f"load: {where} is {got} in the model; the file has shape {tuple(entry['shape'])}")
        row = LayerRow(name=where, kind=type(owner).__name__, shape=tuple(t.shape), n=entry["n"],
                       terms=entry["terms"], params_before=0, params_after=0, status="skipped")
        if "tied_to" in entry:
            if entry["tied_to"] not in by_name:
                raise ValueError(f"load: {where} is recorded as tied to {entry['tied_to']!r}, which the file does not hold")
            by_name[entry["tied_to"]].tied.append((owner, entry["tensor"]))
            continue
        settings = {k: entry[k] for k in ("n", "terms", "algebra")}
        target = by_name[where] = Target(owner, entry["tensor"], tuple(t.shape), entry["chunks"])
        plans.append(Plan(candidate=None, row=row, settings=settings, targets=[target]))
    return plans


def load(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Parametrize `base` (the dense architecture, freshly built) as recorded in `path` and load its weights
    strictly. Returns `base`, converted in place; on any error (a recorded layer missing or of another shape,
    missing / unexpected / mis-shaped keys) `base` is left as it was."""
    record, state = read_record(path)
    plans = _plans(base, record)
    undo = apply_plans(plans, warm_start=True)
    try:
        own = base.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                     "shape mismatch for " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                       for k in shapes) if shapes else ""]
            raise ValueError(f"load: the state dict in {os.fspath(path)!r} does not fit the model: "
                             + "; ".join(p for p in parts if p))
        base.load_state_dict(state, strict=True)
    except BaseException:
        undo.undo()
        raise
    return base
