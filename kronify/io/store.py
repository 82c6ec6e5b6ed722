"""Where a save lives on disk: one safetensors file, or a directory in the layout of a PEFT save.

A file (`*.safetensors`) holds the tensors (factors under their record names, see `record.py`) and, in its
safetensors metadata under "kronify", the JSON record. A directory holds

- `kronify_config.json`: the record, readable (format, versions, KronConfig, the Kronecker layout);
- `kronify_model.safetensors`: the file above, record included (the two must agree: a mismatch means an
  interrupted save and is refused at load);
- `config.json` (and `generation_config.json`) for a transformers model, so that `kronify.from_pretrained`
  can build it.

The weights are not called `model.safetensors` on purpose: transformers would load that file into a dense model
with the Kronecker layers missing and only log a report (it no longer checks the safetensors "format"
metadata), and Trainer's resume would do the same; without it both fail loudly. Every file is written to a
temporary file in the same directory and moved into place, so an interrupted save never corrupts one.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Callable

import torch

from kronify.io.record import check_format

__all__ = ["CONFIG", "WEIGHTS", "check_target", "is_directory", "read_save", "write_atomic", "write_weights"]

CONFIG = "kronify_config.json"
WEIGHTS = "kronify_model.safetensors"
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors")


def is_directory(path: str) -> bool:
    """A save goes to a directory unless `path` names a file: an existing file or a `*.safetensors` name."""
    return os.path.isdir(path) or not (os.path.exists(path) or path.endswith(".safetensors"))


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) to a temporary file beside `path`, then move it into place; on any error remove it. The file
    gets the permissions of any new file (mkstemp's would be owner-only)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f"{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as to any new file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_weights(path: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "kronify": json.dumps(record)}))


def _is_kronify_file(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return "kronify" in (f.metadata() or {})
    except Exception:
        return False


def check_target(path: str) -> None:
    """Refuse, before anything is written, a save that would overwrite files that are not a kronify save: an
    existing file without kronify metadata, or a directory (not yet a kronify save) holding a model's files.
    Other files in a directory (a tokenizer, a README) are left alone, as PEFT does."""
    if not is_directory(path):
        if os.path.exists(path) and not _is_kronify_file(path):
            raise FileExistsError(f"save: {path!r} exists and is not a kronify save; nothing was written "
                                  "(remove it or choose another path)")
        return
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, CONFIG)):
        clash = [f for f in (WEIGHTS, *HF_FILES) if os.path.exists(os.path.join(path, f))]
        if clash:
            raise FileExistsError(f"save: directory {path!r} holds {', '.join(clash)} but no {CONFIG}: another "
                                  "model's files, which a kronify save would mix with its own; nothing was written "
                                  "(save into a new or empty directory)")


def _read_file(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    if "kronify" not in meta:
        raise ValueError(f"{path!r} is not a kronify.save file (no 'kronify' metadata)")
    record = json.loads(meta["kronify"])
    check_format(record, repr(path))
    return record, load_file(path)


def read_save(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors under their file names) of a save: a file, or a directory checked to be complete."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if not os.path.isdir(path):
        return _read_file(path)
    config = os.path.join(path, CONFIG)
    if not os.path.exists(config):
        found = [f for f in HF_FILES if os.path.exists(os.path.join(path, f))]
        hint = (f" (it holds {', '.join(found)}: a transformers checkpoint? Load it with from_pretrained, then "
                "kronify.convert it)") if found else ""
        raise ValueError(f"{path!r} is not a kronify save: it has no {CONFIG}{hint}")
    try:
        with open(config) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config!r} is not readable JSON: {e}") from None
    check_format(record, repr(config))
    weights = os.path.join(path, WEIGHTS)
    if not os.path.exists(weights):
        raise ValueError(f"{path!r}: {WEIGHTS} is missing (an interrupted save?)")
    stored, tensors = _read_file(weights)
    if stored != record:
        raise ValueError(f"{path!r}: {CONFIG} and {WEIGHTS} come from different saves (an interrupted save, or "
                         f"one of them edited or copied in): save again")
    return record, tensors
