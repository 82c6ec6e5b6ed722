"""The kronify record: which tensors of a model are Kronecker-parametrized, and how (n, terms, algebra, chunks,
ties), plus the KronConfig and the versions that wrote it. It is what `kronify.load` needs to rebuild the
layout on a freshly built dense model, and it names the factors in the file.

In memory a factor keeps torch's parametrize name (`<layer>.parametrizations.weight.original0`): optimizers,
DDP/FSDP and distributed checkpoints match state-dict keys to `named_parameters()`, which torch does not let
us rename. In the file (format 3) each factor says what it holds: `<layer>.weight.kron_A` and
`<layer>.weight.kron_F` (for a fixed algebra, kron_A is its constant matrices). Format 2 files (kronify 0.1)
hold torch's names and still load.
"""

from __future__ import annotations

import sys
from importlib import metadata

import torch
from torch import nn
from torch.nn.utils import parametrize

from kronify.algebra import LEARNED
from kronify.config import KronConfig
from kronify.parametrization import KronParametrization, kron_parametrizations
from kronify.plan import Plan, Target
from kronify.report import LayerRow

__all__ = ["FORMAT", "check_format", "file_keys", "make_record", "plans_from_record", "record_config"]

FORMAT = 3
READABLE = (2, 3)  # 2: torch's parametrize names in the file


def kronify_version() -> str:
    try:
        return metadata.version("kronify")
    except metadata.PackageNotFoundError:
        return "unknown"


def _where(owner: str, tensor: str) -> str:
    return f"{owner}.{tensor}" if owner else tensor


def make_record(model: nn.Module, config: KronConfig | None) -> dict:
    """The record of `model`'s Kronecker tensors; raises if it has none."""
    tensors, first = [], {}
    for owner_name, owner, name, p in kron_parametrizations(model):
        where = _where(owner_name, name)
        source = first.setdefault(id(owner.parametrizations[name]), where)  # a tied head: its embedding's
        tensors.append({"owner": owner_name, "tensor": name, "shape": list(p.shape), "chunks": p.chunks, **p.config(),
                        **({"tied_to": source} if source != where else {})})
    if not tensors:
        raise ValueError("save: the model has no Kronecker layers (convert it first, or use safetensors directly)")
    transformers = sys.modules.get("transformers")
    return {"format": FORMAT, "kronify_version": kronify_version(), "torch_version": torch.__version__,
            "transformers_version": getattr(transformers, "__version__", None),
            "config": config.to_dict() if config is not None else None, "tensors": tensors}


def check_format(record: dict, source: str) -> None:
    """Raise, naming `source`, unless this kronify reads the record's format."""
    if not isinstance(record, dict) or "tensors" not in record:
        raise ValueError(f"{source}: not a kronify record (no 'tensors' entry)")
    if record.get("format") not in READABLE:
        raise ValueError(f"{source}: kronify format {record.get('format')!r} (written by kronify "
                         f"{record.get('kronify_version', 'unknown')}); this kronify ({kronify_version()}) reads "
                         f"formats {', '.join(map(str, READABLE))}: upgrade kronify to load it")


def record_config(record: dict, source: str) -> KronConfig | None:
    """The KronConfig stored in the record (None if none was), with `source` named in any error."""
    try:
        return None if record.get("config") is None else KronConfig.from_dict(record["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def file_keys(model: nn.Module, record: dict) -> dict[str, str]:
    """{torch state-dict key: key in the file} for every Kronecker factor of the converted `model`, under every
    path to it (a shared layer, a tied head); empty for format 2 files, which hold torch's names."""
    if record["format"] == 2:
        return {}
    keys = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(module):
            continue
        for tensor, plist in module.parametrizations.items():
            if isinstance(plist[0], KronParametrization):
                prefix, where = f"{_where(path, 'parametrizations')}.{tensor}.", _where(path, tensor)
                learned = plist[0].algebra == LEARNED
                keys[prefix + ("original0" if learned else "0.A")] = f"{where}.kron_A"
                keys[prefix + ("original1" if learned else "original")] = f"{where}.kron_F"
    return keys


def plans_from_record(base: nn.Module, record: dict) -> list[Plan]:
    """The plans that parametrize exactly the recorded tensors of `base` (checked to exist with their shapes)."""
    plans, by_name = [], {}
    for entry in record["tensors"]:
        where = _where(entry["owner"], entry["tensor"])
        try:
            owner = base.get_submodule(entry["owner"])
        except AttributeError:
            raise ValueError(f"load: layer {entry['owner']!r} recorded in the file is not in the model") from None
        t = owner._parameters.get(entry["tensor"])
        if t is None and parametrize.is_parametrized(owner, entry["tensor"]):
            raise ValueError(f"load: {where} is already parametrized (converted?); load onto a freshly built "
                             "dense model")
        if t is None or tuple(t.shape) != tuple(entry["shape"]):
            got = "missing" if t is None else f"of shape {tuple(t.shape)}"
            raise ValueError(f"load: {where} is {got} in the model; the file has shape {tuple(entry['shape'])}")
        row = LayerRow(name=where, kind=type(owner).__name__, shape=tuple(t.shape), n=entry["n"],
                       terms=entry["terms"], params_before=0, params_after=0, status="skipped")
        if "tied_to" in entry:
            if entry["tied_to"] not in by_name:
                raise ValueError(f"load: {where} is recorded as tied to {entry['tied_to']!r}, which the file does "
                                 "not hold")
            by_name[entry["tied_to"]].tied.append((owner, entry["tensor"]))
            continue
        settings = {k: entry[k] for k in ("n", "terms", "algebra")}
        target = by_name[where] = Target(owner, entry["tensor"], tuple(t.shape), entry["chunks"])
        plans.append(Plan(candidate=None, row=row, settings=settings, targets=[target]))
    return plans
