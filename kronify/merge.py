"""kronify.merge: turn every Kronecker layer back into the plain torch layer with its dense weight.

The merged model has no kronify classes left (attention included), so it exports with
torch.jit.trace / torch.onnx.export and runs with zero overhead.
"""

from __future__ import annotations

import copy

from torch import nn

from kronify.convert import find_candidates, is_kron, transplant

__all__ = ["merge"]


def merge(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace each Kron layer of `model` by `layer.to_dense()`; shared layers stay shared, hooks move.

    Returns the merged model (`model` itself when inplace, else a merged deep copy). A model that is
    itself a Kron layer is returned as its dense layer.
    """
    target = model if inplace else copy.deepcopy(model)
    if is_kron(target):
        return target.to_dense()
    for c in find_candidates(target):
        if is_kron(c.module):
            transplant(target, c.module, c.module.to_dense(), c.paths)
    return target
