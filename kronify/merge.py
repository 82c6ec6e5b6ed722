"""kronify.merge: the way back to plain layers (what PEFT calls merge_and_unload).

Each Kronecker parametrization is removed with `torch.nn.utils.parametrize.remove_parametrizations(...,
leave_parametrized=True)`: the tensor becomes a plain Parameter holding the dense weight Σ A_t ⊗ F_t, and a
layer with no parametrization left gets its own class back. The merged model has no kronify state, so
it exports (torch.jit.trace, torch.onnx.export), pickles, and saves with `save_pretrained`.
A user parametrization stacked on the Kronecker one (registered after conversion) is baked in with it;
one that the Kronecker structure sits under stays.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from kronify.io import forget_config
from kronify.linked_weight import plain_reads, unlink
from kronify.parametrization import is_kron, kron_parametrizations

__all__ = ["merge"]


def merge(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every Kronecker-parametrized weight of `model` by its dense value; frozen factors give a
    frozen weight. Returns `model` (inplace) or a merged deep copy."""
    target = model if inplace else copy.deepcopy(model)
    merged: dict[int, nn.Parameter] = {}  # a ParametrizationList shared by tied layers -> the one merged weight
    for _, owner, name, p in list(kron_parametrizations(target)):
        plist = owner.parametrizations[name]
        trainable = any(t.requires_grad for t in plist.parameters())
        # deepcopy shares torch's per-module Parametrized class between copies; removing the property from
        # that shared class would strip it from every copy, so this module gets a class of its own first
        cls = owner.__class__
        owner.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        with plain_reads():
            parametrize.remove_parametrizations(owner, name, leave_parametrized=True)
        if name in owner._buffers:  # torch leaves a frozen multi-factor tensor as a buffer
            owner._parameters[name] = nn.Parameter(owner._buffers.pop(name).detach(), trainable)
        owner._parameters[name].requires_grad_(trainable)
        owner._parameters[name] = merged.setdefault(id(plist), owner._parameters[name])  # tied stay tied
        order = {k: i for i, k in enumerate(p.param_order)}  # the layer's own order: weight before bias
        owner._parameters = dict(sorted(owner._parameters.items(), key=lambda kv: order.get(kv[0], len(order))))
        if not is_kron(owner):
            unlink(owner)
    forget_config(target)  # a plain model again: transformers' own save_pretrained
    return target
