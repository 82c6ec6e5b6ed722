"""Model inputs as users hand them over: a tensor, a tuple of positional inputs, or a dict of keyword inputs
(as Hugging Face models take them). Calibration and distillation both feed such batches to a model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["call_model", "move_batch", "output_tensor", "iterate_batches"]


def call_model(model: nn.Module, batch: Any) -> Any:
    """model(**batch) for a mapping, model(*batch) for a tuple/list, model(batch) otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def move_batch(batch: Any, device: torch.device | str | None) -> Any:
    """The batch with every tensor in it moved to `device` (None: unchanged); structure kept."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move_batch(v, device) for v in batch)
    if isinstance(batch, list):
        return [move_batch(v, device) for v in batch]
    return batch


def output_tensor(output: Any) -> Tensor:
    """The tensor a model's output stands for: itself, `.logits` (Hugging Face), a dict's "logits" or first
    tensor, or a tuple's first element."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        for v in output.values():
            if isinstance(v, Tensor):
                return v
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot tell which tensor the model's output of type {type(output).__name__} stands for; "
                    "pass output=<a function that picks it>")


def iterate_batches(batches: Iterable[Any], what: str) -> Iterator[Any]:
    """iter(batches), with an error naming `what` when it is a single tensor/dict or not iterable at all."""
    if isinstance(batches, (Tensor, Mapping)):
        raise TypeError(f"{what}: pass an iterable of batches (e.g. a list or a DataLoader), not a single "
                        f"{type(batches).__name__}; wrap it as [batch]")
    try:
        return iter(batches)
    except TypeError:
        raise TypeError(f"{what}: batches must be an iterable of model inputs, got {type(batches).__name__}") from None
