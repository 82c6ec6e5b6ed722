"""kronify.save / kronify.load / kronify.from_pretrained: a converted model on disk, safetensors only, no pickle.

`save(model, "DIR")` writes a directory as PEFT does: `kronify_config.json` (the record: format, versions,
KronConfig, and per Kronecker tensor its owner, name, shape, chunks, n, terms, algebra[, tied_to]),
`kronify_model.safetensors` (the state dict; factors as `<layer>.weight.kron_A` / `.kron_F`) and, for a
transformers model, its `config.json`. `save(model, "x.safetensors")` writes the single file of kronify 0.1
(the record in its metadata). `load(model, path)` rebuilds the layout on a model the user built; for a
transformers model, `from_pretrained("DIR")` builds it from config.json too. See `store.py` for the layout
and `record.py` for the key names.

A converted or loaded model remembers its KronConfig (`model.kronify_config`, as PEFT's `peft_config`;
`remember_config`), so `save` stores it without being passed it, and a transformers model's `save_pretrained`
writes a kronify save instead of a checkpoint transformers would load with random Kronecker layers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from kronify.apply import apply_plans
from kronify.config import CONFIG_ATTRIBUTE, KronConfig
from kronify.io.hf import (KronSavePretrained, build_model, install_save_pretrained, is_transformers_model,
                           write_configs)
from kronify.io.record import file_keys, make_record, plans_from_record, record_config
from kronify.io.store import CONFIG, WEIGHTS, check_target, is_directory, read_save, write_atomic, write_weights

__all__ = ["forget_config", "from_pretrained", "load", "read_record", "remember_config", "save"]


def save(model: nn.Module, path: str | os.PathLike, config: KronConfig | None = None, *,
         state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model`'s Kronecker layout and weights to `path`: a directory (an existing one, or any path not
    ending in ".safetensors"), or a single `*.safetensors` file. `config` (the KronConfig; default: the one
    `model` was converted or loaded with) is stored with them; `state_dict` replaces `model.state_dict()` (e.g.
    one gathered from FSDP). Into an existing directory only kronify's files are written; a path holding another
    model's files is refused and nothing is overwritten. Each file is written atomically."""
    path = os.fspath(path)
    record = make_record(model, config if config is not None else getattr(model, CONFIG_ATTRIBUTE, None))
    check_target(path)
    keys = file_keys(model, record)
    state = model.state_dict() if state_dict is None else state_dict
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise ValueError(f"save: the state dict lacks the Kronecker factors {missing}")
    seen: set[int] = set()
    tensors = {}
    for k, v in state.items():  # tensors sharing memory (ties) are stored once under each name
        v = v.detach()
        tensors[keys.get(k, k)] = v.clone().contiguous() if v.data_ptr() in seen else v.contiguous()
        seen.add(v.data_ptr())
    if not is_directory(path):
        write_weights(path, tensors, record)
        return
    os.makedirs(path, exist_ok=True)
    write_atomic(os.path.join(path, CONFIG), lambda tmp: _write_json(tmp, record))
    write_weights(os.path.join(path, WEIGHTS), tensors, record)
    if is_transformers_model(model):
        write_configs(model, path)


def _write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def read_record(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors under their names in the file) of a save written by `save` (a file or a directory)."""
    return read_save(os.fspath(path))


def _load_into(model: nn.Module, record: dict, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    config = record_config(record, source)
    undo = apply_plans(plans_from_record(model, record), warm_start=True)
    try:
        keys = file_keys(model, record)
        own = {keys.get(k, k): v for k, v in model.state_dict().items()}
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        shapes = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
        if missing or unexpected or shapes:
            parts = [f"missing keys {missing}" if missing else "",
                     f"unexpected keys {unexpected}" if unexpected else "",
                     "shape mismatch for " + ", ".join(f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}"
                                                       for k in shapes) if shapes else ""]
            raise ValueError(f"load: the state dict in {source} does not fit the model: "
                             + "; ".join(p for p in parts if p))
        names = {v: k for k, v in keys.items()}
        model.load_state_dict({names.get(k, k): v for k, v in tensors.items()}, strict=True)
    except BaseException:
        undo.undo()
        raise
    remember_config(model, config)
    return model


def remember_config(model: nn.Module, config: KronConfig | None) -> None:
    """Keep `config` on `model` (the attribute `kronify_config`), for `save`; route a transformers model's
    `save_pretrained` through kronify. Instance attributes: nothing runs per forward, deepcopy carries them."""
    setattr(model, CONFIG_ATTRIBUTE, config)
    install_save_pretrained(model)


def forget_config(model: nn.Module) -> None:
    """Undo `remember_config` (kronify.merge: the model is plain again)."""
    model.__dict__.pop(CONFIG_ATTRIBUTE, None)
    if isinstance(model.__dict__.get("save_pretrained"), KronSavePretrained):
        del model.__dict__["save_pretrained"]


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Parametrize `model` (the dense architecture, freshly built) as recorded in the save at `path` (a
    directory or a file) and load its weights strictly. Returns `model`, converted in place; on any error (not a
    save, an unknown format, a recorded layer missing or of another shape, missing / unexpected / mis-shaped
    tensors) `model` is left as it was."""
    path = os.fspath(path)
    record, tensors = read_save(path)
    return _load_into(model, record, tensors, repr(path))


def from_pretrained(directory: str | os.PathLike, model_class: Any = None) -> nn.Module:
    """The transformers model saved in `directory` by `kronify.save` (or a converted model's `save_pretrained`):
    built from its config.json (as `model_class` if given: a model class or an Auto class), converted as
    recorded, its weights loaded, in the saved dtype, in eval mode. Nothing is downloaded."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"from_pretrained: {directory!r} is not a directory (load a file onto a model you built "
                         "with kronify.load(model, path))")
    record, tensors = read_save(directory)
    model = build_model(directory, model_class)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    return _load_into(model, record, tensors, repr(directory)).eval()
