"""Hugging Face transformers: a kronify save carries the model's config.json, `kronify.from_pretrained` builds the
model from it, and `save_pretrained` on a converted model writes a kronify save instead of a checkpoint that
transformers would load with random Kronecker layers.

transformers is imported only when a model or a directory needs it; a model that is a `PreTrainedModel` means
it is already imported.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

from torch import nn

from kronify.io.store import write_atomic
from kronify.parametrization import kron_parametrizations

__all__ = ["KronSavePretrained", "build_model", "install_save_pretrained", "is_transformers_model", "write_configs"]

HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
# save_pretrained arguments that change nothing about one local safetensors save
_IGNORED = {"max_shard_size", "safe_serialization", "save_peft_format", "save_original_format", "token"}


def is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def write_configs(model: nn.Module, directory: str) -> None:
    """config.json (with `architectures` set to the model's class, as save_pretrained does) and, for a generative
    model, generation_config.json; the model's own config is not modified."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    write_atomic(os.path.join(directory, HF_CONFIG), config.to_json_file)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        write_atomic(os.path.join(directory, GENERATION_CONFIG), generation.to_json_file)


def build_model(directory: str, model_class: Any = None) -> nn.Module:
    """The dense transformers model described by `directory`/config.json: `model_class` (a PreTrainedModel class,
    built as cls(config), or an Auto class, built with from_config), else the class named in `architectures`.
    Weights are random; nothing is downloaded."""
    if not os.path.exists(os.path.join(directory, HF_CONFIG)):
        raise ValueError(f"from_pretrained: {directory!r} has no {HF_CONFIG} (saved from a model that is not a "
                         "transformers model?): build the model yourself and call kronify.load(model, directory)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"from_pretrained: {directory}/{HF_CONFIG} names no transformers model class "
                             f"(architectures={names!r}); pass model_class=")
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        model = model_class(config)
    else:
        model = model_class.from_config(config)
    if model.can_generate() and os.path.exists(os.path.join(directory, GENERATION_CONFIG)):
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory, local_files_only=True)
    return model


class KronSavePretrained:
    """`model.save_pretrained` of a converted transformers model (set on the instance by convert / load): while
    the model has Kronecker layers it writes a kronify save (`kronify.save(model, directory)`, with the config the
    model remembers), which `kronify.from_pretrained(directory)` loads; once merged it is transformers' own
    save_pretrained again.

    Trainer's call (`state_dict=`, `is_main_process=`) is supported; arguments a kronify save cannot honour
    (push_to_hub, variant, distributed_checkpoint, ...) raise instead of being dropped."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                 state_dict: dict | None = None, **kwargs: Any) -> None:
        model = self.model
        if next(kron_parametrizations(model), None) is None:  # merged: a plain transformers model again
            return type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                               state_dict=state_dict, **kwargs)
        unsupported = sorted(k for k, v in kwargs.items() if k not in _IGNORED and v is not None and v is not False)
        if unsupported:
            raise ValueError(f"save_pretrained on a Kronecker model writes a kronify save (kronify.save), which "
                             f"does not support {', '.join(unsupported)}; for a plain transformers checkpoint, "
                             "kronify.merge(model) first")
        if is_main_process:
            from kronify.io import save  # here: kronify.io imports this module

            save(model, save_directory, state_dict=state_dict)

    def __repr__(self) -> str:
        return f"<kronify save_pretrained of {type(self.model).__name__}>"


def install_save_pretrained(model: nn.Module) -> None:
    """Route `model.save_pretrained` through kronify while it has Kronecker layers (transformers models only).
    An instance attribute: nothing runs per forward, and deepcopy carries it over to the copy."""
    if is_transformers_model(model):
        model.save_pretrained = KronSavePretrained(model)
