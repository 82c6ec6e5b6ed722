"""KronMultiheadAttention: nn.MultiheadAttention with Kronecker q/k/v and output projections.

W_q, W_k and W_v are each their own Kronecker sum Σ_t A_t ⊗ F_t (as the PHM transformer replaces each
projection by a PHM layer), held by `q_proj`, `k_proj`, `v_proj` (bias-free KronLinear), and
`out_proj` is a KronLinear. `in_proj_weight` (or `q/k/v_proj_weight` when kdim/vdim differ from
embed_dim) is a computed property, so torch's own forward, fast path included, uses the factors:
no dense projection weight remains a parameter. `in_proj_bias`, `bias_k`, `bias_v` stay dense.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kronify.algebra import LEARNED
from kronify.kron import kron_weight
from kronify.layers.linear import KronLinear

__all__ = ["KronMultiheadAttention"]


def _as_linear(weight: Tensor) -> nn.Linear:
    """A bias-free nn.Linear view of `weight` (no copy), for KronLinear.from_dense."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return lin


class KronMultiheadAttention(nn.MultiheadAttention):
    """Drop-in nn.MultiheadAttention (same arguments) plus keyword-only n, terms and algebra."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        n: int = 2,
        terms: int | None = None,
        algebra: str = LEARNED,
    ) -> None:
        # nn.MultiheadAttention.__init__ would register dense projection Parameters under the names
        # that are properties here, so only nn.Module is initialised and torch's attributes are set.
        nn.Module.__init__(self)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kron = {"n": n, "terms": terms, "algebra": algebra, **factory}
        self.q_proj = KronLinear(embed_dim, embed_dim, bias=False, **kron)
        self.k_proj = KronLinear(self.kdim, embed_dim, bias=False, **kron)
        self.v_proj = KronLinear(self.vdim, embed_dim, bias=False, **kron)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = KronLinear(embed_dim, embed_dim, bias=bias, **kron)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.warm_start_error: float | None = None
        self._match_xavier_init()
        if bias:
            with torch.no_grad():
                self.out_proj.bias.zero_()

    def _match_xavier_init(self) -> None:
        """Scale the cold-start q/k/v factors to the variance torch's xavier_uniform_ gives these weights."""
        with torch.no_grad():
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                if proj.F.is_meta:
                    continue
                fan_in = self.embed_dim if self._qkv_same_embed_dim else proj.in_features
                fan_out = 3 * self.embed_dim if self._qkv_same_embed_dim else self.embed_dim
                target = 2.0 / (fan_in + fan_out)  # Var(U(-b, b)) with b = sqrt(6 / (fan_in + fan_out))
                var = float(kron_weight(proj.A, proj.F).var())
                if var > 0:
                    proj.F.mul_(math.sqrt(target / var))

    # ---- the projections torch's forward reads ------------------------------------------------
    _packed_in_proj: Tensor | None = None  # set only while forward runs

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any):
        """torch's forward, with the packed q/k/v weight built once per call (torch reads it several times)."""
        if not self._qkv_same_embed_dim:
            return super().forward(query, key, value, *args, **kwargs)
        self._packed_in_proj = self._pack_in_proj()
        try:
            return super().forward(query, key, value, *args, **kwargs)
        finally:
            self._packed_in_proj = None

    def _pack_in_proj(self) -> Tensor:
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        if not self._qkv_same_embed_dim:
            return None
        return self._packed_in_proj if self._packed_in_proj is not None else self._pack_in_proj()

    @property
    def q_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    @property
    def n(self) -> int:
        return self.q_proj.n

    @property
    def terms(self) -> int:
        return self.q_proj.terms

    @property
    def algebra(self) -> str:
        return self.q_proj.algebra

    def kron_config(self) -> dict[str, Any]:
        """The conversion settings: dict(n=..., terms=..., algebra=...)."""
        return self.q_proj.kron_config()

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
            f"batch_first={self.batch_first}, n={self.n}, terms={self.terms}, algebra={self.algebra!r}"
        )

    # ---- conversion ---------------------------------------------------------------------------
    @staticmethod
    def _dense_projections(mha: nn.MultiheadAttention) -> list[Tensor]:
        if mha._qkv_same_embed_dim:
            return list(mha.in_proj_weight.detach().chunk(3))
        return [mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()]

    @classmethod
    def from_dense(
        cls,
        mha: nn.MultiheadAttention,
        n: int,
        terms: int | None = None,
        algebra: str = LEARNED,
        warm_start: bool = False,
    ) -> KronMultiheadAttention:
        """Kron attention with `mha`'s configuration, device, dtype and biases; `mha` is not modified.

        warm_start=True fits each projection by its nearest Kronecker sum; `.warm_start_error` is
        the combined relative Frobenius error of the four projection weights.
        """
        if type(mha) is not nn.MultiheadAttention:
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.out_proj.weight
        # with a warm start every projection is replaced below, so nothing is initialised for nothing
        new = cls(
            mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device="meta" if warm_start else ref.device, dtype=ref.dtype,
            n=n, terms=terms, algebra=algebra,
        )
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            src = getattr(mha, name)
            if src is not None:
                setattr(new, name, nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad))
        if warm_start:
            weights = cls._dense_projections(mha) + [ref.detach()]
            names = ("q_proj", "k_proj", "v_proj", "out_proj")
            for name, w in zip(names, weights):
                dense = mha.out_proj if name == "out_proj" else _as_linear(w)
                setattr(new, name, KronLinear.from_dense(dense, n, terms, algebra, warm_start=True))
            sq = [float(w.double().pow(2).sum()) for w in weights]
            errs = [getattr(new, nm).warm_start_error for nm in names]
            total = sum(sq)
            new.warm_start_error = math.sqrt(sum(e * e * s for e, s in zip(errs, sq)) / total) if total > 0 else 0.0
        elif mha.out_proj.bias is not None:
            with torch.no_grad():
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        new.train(mha.training)
        return new

    def to_dense(self) -> nn.MultiheadAttention:
        """The plain nn.MultiheadAttention carrying the dense projection weights and the biases."""
        ref = self.out_proj.F
        dense = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device=ref.device, dtype=ref.dtype,
        )
        with torch.no_grad():
            q, k, v = (p.to_dense().weight for p in (self.q_proj, self.k_proj, self.v_proj))
            if self._qkv_same_embed_dim:
                dense.in_proj_weight.copy_(torch.cat([q, k, v]))
            else:
                dense.q_proj_weight.copy_(q)
                dense.k_proj_weight.copy_(k)
                dense.v_proj_weight.copy_(v)
            dense.out_proj.weight.copy_(self.out_proj.to_dense().weight)
            for name in ("in_proj_bias", "bias_k", "bias_v"):
                src = getattr(self, name)
                if src is not None:
                    getattr(dense, name).copy_(src)
            if self.out_proj.bias is not None:
                dense.out_proj.bias.copy_(self.out_proj.bias)
        dense.train(self.training)
        return dense
