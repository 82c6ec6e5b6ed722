"""The kinds of layer kronify converts: which weights a layer's forward reads, and what their dims are.

Adding a kind of layer starts here: `weight_names` says which tensors of a module are Kronecker candidates
(and into how many chunks dim 0 splits), `dim_names` names their first two dims for messages.
"""

from __future__ import annotations

from torch import nn

__all__ = ["dim_names", "embedding_problem", "is_hf_conv1d", "weight_names"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and relatives): a Linear whose weight is stored (in, out)."""
    return any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers") for k in type(module).__mro__)


def weight_names(module: nn.Module, embeddings: bool = False) -> list[tuple[str, int]]:
    """(tensor name, chunks of dim 0) of the weights `module`'s forward reads; [] for other modules.
    nn.Embedding counts only when `embeddings` is set (KronConfig.embeddings)."""
    if isinstance(module, nn.Embedding):
        return [("weight", 1)] if embeddings else []
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return [("in_proj_weight", 3)]
        return [("q_proj_weight", 1), ("k_proj_weight", 1), ("v_proj_weight", 1)]
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_hf_conv1d(module):
        return [("weight", 1)]
    return []


def dim_names(module: nn.Module, name: str) -> tuple[str, str]:
    """What the weight's first two dims are, in the layer's own terms (for messages)."""
    if isinstance(module, nn.Embedding):
        return "num_embeddings", "embedding_dim"
    if isinstance(module, nn.MultiheadAttention):
        return "embed_dim", {"k_proj_weight": "kdim", "v_proj_weight": "vdim"}.get(name, "embed_dim")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "in_channels", "out_channels/groups"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "out_channels", "in_channels/groups"
    return ("in_features", "out_features") if is_hf_conv1d(module) else ("out_features", "in_features")


def embedding_problem(module: nn.Module) -> str:
    """Why an nn.Embedding cannot take a computed weight ("" when it can): max_norm renormalises rows of the
    weight in place during forward, and sparse gradients need a leaf weight."""
    if getattr(module, "max_norm", None) is not None:
        return "embedding with max_norm (its forward renormalises the weight in place)"
    return "embedding with sparse=True (sparse gradients need a plain weight)" if getattr(module, "sparse", False) else ""
