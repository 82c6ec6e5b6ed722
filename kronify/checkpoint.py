"""Convert from a safetensors checkpoint: `kronify.convert(model, ..., checkpoint=PATH)` on a model built on the
meta device (or anywhere), reading one tensor at a time.

`Checkpoint` reads only the headers when opened (a `*.safetensors` file, a Hugging Face sharded
`*.safetensors.index.json`, or a directory holding either) and later each tensor with plain file reads into a
tensor of its own, so a tensor read is resident only while something holds it (memory-mapping the file would
keep every page it touched in the process's resident set). `match_checkpoint` pairs every tensor of the model
with a checkpoint entry before anything changes: a missing tensor, a wrong shape or a non-float entry for a float
tensor raises, naming them. `Loading` then reads the dense weights of the converted layers for
`kronify.apply.apply_plans` and stages every other parameter and buffer, and `assign` puts those in.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kronify.plan import Plan, Target

__all__ = ["Checkpoint", "Loading", "match_checkpoint"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def _read_header(path: str) -> dict[str, _Entry]:
    """The entries of one safetensors file; ValueError naming the file if it is not one."""
    def bad(why: str) -> ValueError:
        return ValueError(f"checkpoint: {path!r} is not a safetensors file ({why})")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise bad(f"header length {length} does not fit the file of {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is {info!r}, not a tensor of a known dtype") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes or start < 0 or 8 + length + end > size:
            raise bad(f"entry {name!r} has offsets {start}..{end}, not {nbytes} bytes within the file")
        entries[name] = _Entry(path, dtype, shape, 8 + length + start, nbytes)
    return entries


def _files(path: str) -> list[str]:
    """The safetensors files of a checkpoint path: a file, an index (`weight_map`), or a directory with either."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "kronify_config.json")):
            raise ValueError(f"checkpoint: {path!r} is a kronify save (converted factors), not a dense checkpoint: "
                             "load it with kronify.load(model, path) or kronify.from_pretrained(path)")
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        found = found or sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) != 1:
            raise ValueError(f"checkpoint: {path!r} should hold one *.safetensors file or one "
                             f"*.safetensors.index.json, found {found or 'none'}")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: {path!r} does not exist")
    if not path.endswith(".json"):
        return [path]
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"checkpoint: {path!r} is not a safetensors index with a 'weight_map' ({e})") from None
    return [os.path.join(os.path.dirname(path), s) for s in shards]


class Checkpoint:
    """The tensors of a safetensors checkpoint (see the module docstring); only headers are read when opened."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.entries: dict[str, _Entry] = {}
        for file in _files(self.path):
            if not os.path.isfile(file):
                raise ValueError(f"checkpoint: the shard {file!r} listed in {self.path!r} does not exist")
            self.entries.update(_read_header(file))

    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        """Tensor `name`, read from its file into memory of its own, cast to `dtype` and moved to `device`."""
        e = self.entries[name]
        raw = torch.empty(e.nbytes, dtype=torch.uint8)
        with open(e.file, "rb") as f:
            f.seek(e.offset)
            view, got = memoryview(raw.numpy()), 0
            while got < e.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"checkpoint: {e.file!r} ends inside tensor {name!r}")
                got += n
        t = raw.view(e.dtype).reshape(e.shape)
        return t.to(device=device, dtype=dtype or e.dtype)


@dataclass
class _Slot:
    """One distinct tensor of the model: where it is held (module, name, is a parameter) and its checkpoint key."""

    tensor: Tensor
    holders: list[tuple[nn.Module, str, bool]]
    key: str | None


def _slots(model: nn.Module) -> tuple[list[_Slot], dict[int, list[str]]]:
    """Every distinct parameter and buffer of `model` with all of its holders (tied weights have several), and
    {id(tensor): all of its dotted names}."""
    slots: dict[int, _Slot] = {}
    names: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for is_param, table in ((True, m._parameters), (False, m._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                slot = slots.setdefault(id(t), _Slot(t, [], None))
                if all(h[0] is not m or h[1] != name for h in slot.holders):
                    slot.holders.append((m, name, is_param))
                names.setdefault(id(t), []).append(f"{mname}.{name}" if mname else name)
    return list(slots.values()), names


class Loading:
    """A checked pairing of a model's tensors with a checkpoint (made by `match_checkpoint`)."""

    def __init__(self, checkpoint: Checkpoint, slots: list[_Slot], converted: set[int], hf_buffers: list) -> None:
        self.checkpoint, self.slots, self.converted, self.hf_buffers = checkpoint, slots, converted, hf_buffers
        self.by_id = {id(s.tensor): s for s in slots}

    def read(self, target: Target) -> Tensor:
        """The dense tensor of a converted target, from the checkpoint, in the model's dtype."""
        t = target.owner._parameters[target.tensor]
        key = self.by_id[id(t)].key
        return self.checkpoint.read(key, t.dtype, "cpu" if t.is_meta else t.device)

    def stage(self) -> list[tuple[_Slot, Tensor]]:
        """Every tensor that is not converted, read (or, for a Hugging Face non-persistent buffer on the meta
        device, computed by the model's own `_init_weights` on a copy of its module); changes nothing."""
        staged = []
        for slot in self.slots:
            if id(slot.tensor) in self.converted or slot.key is None:
                continue
            t = slot.tensor
            staged.append((slot, self.checkpoint.read(slot.key, t.dtype, "cpu" if t.is_meta else t.device)))
        for init, module, slots in self.hf_buffers:
            twin = copy.deepcopy(module)
            for name in twin._buffers:
                if twin._buffers[name] is not None and twin._buffers[name].is_meta:
                    twin._buffers[name] = torch.empty_like(twin._buffers[name], device="cpu")
            init(twin)
            staged += [(slot, twin._buffers[slot.holders[0][1]]) for slot in slots]
        return staged

    @staticmethod
    def assign(staged: list[tuple[_Slot, Tensor]]) -> None:
        """Put the staged tensors in, one object per distinct tensor (ties stay tied)."""
        for slot, value in staged:
            new = None
            for module, name, is_param in slot.holders:
                if is_param:
                    new = new if new is not None else nn.Parameter(value, slot.tensor.requires_grad)
                    module._parameters[name] = new
                else:
                    module._buffers[name] = value


def match_checkpoint(model: nn.Module, checkpoint: Checkpoint, plans: list[Plan]) -> Loading:
    """Pair every parameter and buffer of `model` with a checkpoint entry (any of a tied tensor's names will do),
    changing nothing. Raises ValueError listing the tensors the checkpoint lacks, has in another shape or with a
    non-float dtype for a float tensor. Non-persistent buffers need no entry; on the meta device they are computed
    by a Hugging Face model's `_init_weights`, or else refused."""
    slots, aliases = _slots(model)
    entries = checkpoint.entries
    converted = {id(t.owner._parameters[t.tensor]) for p in plans for t in p.targets}
    missing, shapes, dtypes, meta_buffers = [], [], [], []
    for slot in slots:
        names = aliases[id(slot.tensor)]
        slot.key = next((n for n in names if n in entries), None)
        if slot.key is None:
            persistent = any(is_param or name not in m._non_persistent_buffers_set
                             for m, name, is_param in slot.holders)
            if persistent:
                missing.append(names[0])
            elif slot.tensor.is_meta:
                meta_buffers.append(slot)
            continue
        e, t = entries[slot.key], slot.tensor
        if tuple(e.shape) != tuple(t.shape):
            shapes.append(f"{slot.key} {tuple(e.shape)} (the model's is {tuple(t.shape)})")
        elif t.is_floating_point() != e.dtype.is_floating_point:
            dtypes.append(f"{slot.key} {str(e.dtype).removeprefix('torch.')} (the model's is "
                          f"{str(t.dtype).removeprefix('torch.')})")
    hf_buffers, unknown = _hf_buffer_inits(model, meta_buffers, aliases)
    problems = [f"missing {_listed(missing)}" if missing else "",
                f"shape mismatch for {_listed(shapes)}" if shapes else "",
                f"wrong dtype for {_listed(dtypes)}" if dtypes else "",
                f"non-persistent buffers on the meta device that nothing can compute: {_listed(unknown)} (build "
                "the model with real buffers, e.g. parameters only on meta)" if unknown else ""]
    problems = [p for p in problems if p]
    if problems:
        hint = (" (it holds Kronecker factors: load a kronify save with kronify.load)"
                if any(k.endswith(("kron_A", "kron_F")) or ".parametrizations." in k for k in entries) else "")
        raise ValueError(f"checkpoint {checkpoint.path!r} does not fit the model{hint}: " + "; ".join(problems)
                         + ". Nothing was changed.")
    return Loading(checkpoint, slots, converted, hf_buffers)


def _hf_buffer_inits(model: nn.Module, meta_buffers: list[_Slot], aliases: dict) -> tuple[list, list[str]]:
    """[(init, module, slots)] for meta non-persistent buffers that a transformers model's `_init_weights`
    computes (modules holding no parameters of their own, like the rotary embedding's inv_freq); the rest's names."""
    init = getattr(model, "_init_weights", None) if hasattr(model, "config") else None
    by_module: dict[int, tuple[nn.Module, list[_Slot]]] = {}
    unknown = []
    for slot in meta_buffers:
        module, name, _ = slot.holders[0]
        if init is None or len(slot.holders) > 1 or any(p is not None for p in module._parameters.values()):
            unknown.append(aliases[id(slot.tensor)][0])
            continue
        by_module.setdefault(id(module), (module, []))[1].append(slot)
    return [(init, m, s) for m, s in by_module.values()], unknown


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")
