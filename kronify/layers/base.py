"""Machinery shared by every Kronecker layer: factors, dense-weight property, init, from/to dense.

A Kron layer subclasses the torch layer it replaces (so argument handling, `'same'` padding,
padding modes, `output_padding`, `forward` and isinstance checks are torch's own) and swaps the
dense `weight` Parameter for factors A (terms, n, n) and F (terms, rows/n, cols/n, *kernel), where
(rows, cols, *kernel) is the torch weight's shape as torch lays it out: (out, in/groups, *k) for
Linear/Conv, (in, out/groups, *k) for ConvTranspose. `weight` is a read-only property computing
Σ_t A_t ⊗ F_t, which torch's own forward then passes to the functional op together with the bias.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from kronify.algebra import LEARNED, algebra_matrices, resolve_algebra
from kronify.kron import _kron_weight, nearest_kronecker, project_kronecker

__all__ = ["KronMixin", "kron_param_count"]


@functools.cache
def _constructor_args(dense_cls: type[nn.Module]) -> tuple[str, ...]:
    """Names of the torch layer's constructor arguments, without device/dtype."""
    params = inspect.signature(dense_cls.__init__).parameters
    return tuple(name for name in params if name not in ("self", "device", "dtype"))


def kron_param_count(
    out: int,
    in_per_group: int,
    kernel: tuple[int, ...] | list[int] = (),
    n: int = 2,
    terms: int | None = None,
    bias: bool = True,
    *,
    algebra: str = LEARNED,
) -> int:
    """Trainable parameters of a Kron layer: terms·n² + terms·(out/n)·(in_per_group/n)·Π(kernel) + out·bias.

    Convention: counts what `parameters()` holds. With a fixed algebra ("complex", "quaternion")
    A is a non-trainable buffer, so the terms·n² part is dropped. For a ConvTranspose layer pass
    out=out_channels and in_per_group=in_channels/groups (in·(out/g) = out·(in/g), same count).
    """
    terms = resolve_algebra(algebra, n, terms)
    bad = [f"{name}={d}" for name, d in (("out", out), ("in_per_group", in_per_group)) if d % n]
    if bad:
        raise ValueError(f"kron_param_count: {' and '.join(bad)} not divisible by n={n}")
    factors = terms * (out // n) * (in_per_group // n) * math.prod(kernel)
    return (terms * n * n if algebra == LEARNED else 0) + factors + (out if bias else 0)


class KronMixin:
    """Mixin placed before the torch layer class in the MRO (see the module docstring)."""

    _dense_cls: type[nn.Module]  # the torch layer this class replaces
    _dim_names: tuple[str, str]  # names of the weight's (rows, cols) for error messages
    _desc_attrs: tuple[str, ...]  # attributes naming the layer's size in error messages

    A: Tensor
    F: nn.Parameter
    bias: nn.Parameter | None

    # ---- construction -------------------------------------------------------------------------
    def _kron_setup(self, n: int, terms: int | None, algebra: str, device: Any, dtype: Any) -> None:
        """Replace the (meta) dense weight made by the torch constructor with the Kronecker factors."""
        terms = resolve_algebra(algebra, n, terms)
        shape = self._parameters.pop("weight").shape
        rows, cols, kernel = shape[0], shape[1], tuple(shape[2:])
        if rows % n or cols % n:
            bad = [f"{name}={d}" for name, d in zip(self._dim_names, (rows, cols)) if d % n]
            raise ValueError(
                f"{type(self).__name__}({self._dims_desc()}): {' and '.join(bad)} not divisible by n={n}"
            )
        self.n, self.terms, self.algebra = n, terms, algebra
        factory = {"device": device, "dtype": dtype}
        if self.bias is not None:
            self.bias = nn.Parameter(torch.empty(self.bias.shape, **factory))
        A = torch.empty(terms, n, n, **factory)
        if algebra == LEARNED:
            self.A = nn.Parameter(A)
        else:
            self.register_buffer("A", A)
        self.F = nn.Parameter(torch.empty(terms, rows // n, cols // n, *kernel, **factory))
        self.warm_start_error: float | None = None
        self._weight_cache: tuple | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Cold start: Var(W) = 1/(3·fan_in), as torch's kaiming_uniform_(a=√5); bias ±1/√fan_in.

        Every (a, b) fibre A[:, a, b] has unit norm (random direction for "learned", the algebra's
        ±1 pattern otherwise) and F ~ U(−1/√fan_in, 1/√fan_in), so each entry of W has variance
        Σ_t A[t,a,b]²·Var(F) = Var(F) = 1/(3·fan_in).
        """
        if "F" not in self._parameters:  # called by the torch constructor, before the factors exist
            return
        with torch.no_grad():
            if self.algebra == LEARNED:
                self.A.normal_()
                self.A.div_(self.A.norm(dim=0, keepdim=True).clamp_min(1e-12))
            else:
                self.A.copy_(algebra_matrices(self.algebra, dtype=self.A.dtype, device=self.A.device))
            fan_in = self.F.shape[2] * self.n * math.prod(self.F.shape[3:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            self.F.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self._weight_cache = None

    # ---- the dense weight ---------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """Dense weight Σ_t A_t ⊗ F_t, in the torch layer's layout (computed, not a Parameter).

        In eval mode under no_grad it is cached; the cache is keyed on the factors' storage and
        version counters (bumped by optimizer steps, load_state_dict, in-place edits), on the cached
        tensor's own version, and dropped by .train()/.eval()/.to(). Edits made through `.data`
        bypass version counters (as they do for autograd): call `reset_weight_cache()` after those.
        """
        A, F = self.A, self.F
        if (
            self.training
            or torch.is_grad_enabled()
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or torch.is_inference(A)
            or torch.is_inference(F)
        ):
            return _kron_weight(A, F)
        c = self._weight_cache
        if c is not None:
            cA, cF, vA, vF, W, vW = c
            if (
                cA.data_ptr() == A.data_ptr()  # cA/cF keep the old storage alive: no address reuse
                and cF.data_ptr() == F.data_ptr()
                and cA.shape == A.shape and cF.shape == F.shape and W.dtype == F.dtype
                and A._version == vA and F._version == vF and W._version == vW
            ):
                return W
        with torch.inference_mode(False):  # a normal tensor, so its version counter exists
            W = _kron_weight(A, F)
        self._weight_cache = (A.detach(), F.detach(), A._version, F._version, W, W._version)
        return W

    def reset_weight_cache(self) -> None:
        """Drop the cached dense weight (only needed after edits through `.data`)."""
        self._weight_cache = None

    def train(self, mode: bool = True):
        self._weight_cache = None
        return super().train(mode)

    def _apply(self, *args: Any, **kwargs: Any):
        self._weight_cache = None
        return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_weight_cache"] = None
        return state

    # ---- conversion -----------------------------------------------------------------------------
    @classmethod
    def _torch_kwargs(cls, layer: nn.Module) -> dict[str, Any]:
        """Constructor arguments (without device/dtype) that rebuild `layer`'s torch configuration.

        Every torch layer stores each constructor argument under its own name, except `bias`
        (stored as the Parameter or None).
        """
        return {
            name: layer.bias is not None if name == "bias" else getattr(layer, name)
            for name in _constructor_args(cls._dense_cls)
        }

    @classmethod
    def from_dense(
        cls,
        layer: nn.Module,
        n: int,
        terms: int | None = None,
        algebra: str = LEARNED,
        warm_start: bool = False,
    ):
        """Kron layer with `layer`'s configuration, device and dtype; the bias is copied.

        warm_start=False: cold-start factors. warm_start=True: the nearest Kronecker sum to
        layer.weight (`nearest_kronecker`; with a fixed algebra, the least-squares F for that A),
        with the relative Frobenius error stored in `.warm_start_error`. `layer` is not modified.
        The stored `layer.weight` is used as is: a subclass whose forward transforms its weight
        (e.g. weight standardization) must be handled, or skipped, by the caller.
        """
        if not isinstance(layer, cls._dense_cls):
            raise TypeError(f"{cls.__name__}.from_dense expects a {cls._dense_cls.__name__}, got {type(layer).__name__}")
        w = layer.weight.detach()
        new = cls(**cls._torch_kwargs(layer), device="meta", dtype=w.dtype, n=n, terms=terms, algebra=algebra)
        new = new.to_empty(device=w.device)
        with torch.no_grad():
            if warm_start:
                if new.algebra == LEARNED:
                    A, F, err = nearest_kronecker(w, new.n, new.terms)
                else:
                    A = algebra_matrices(new.algebra, dtype=w.dtype, device=w.device)
                    F, err = project_kronecker(w, A)
                new.A.copy_(A)
                new.F.copy_(F)
                new.warm_start_error = err
            else:
                new.reset_parameters()
            if layer.bias is not None:
                new.bias.copy_(layer.bias.detach())
        new.train(layer.training)
        return new

    def to_dense(self) -> nn.Module:
        """The plain torch layer (exact class) holding a detached copy of the dense weight and the bias."""
        dense = self._dense_cls(**self._torch_kwargs(self), device="meta", dtype=self.F.dtype)
        dense = dense.to_empty(device=self.F.device)
        with torch.no_grad():
            dense.weight.copy_(_kron_weight(self.A, self.F))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

    def kron_config(self) -> dict[str, Any]:
        """The conversion settings: dict(n=..., terms=..., algebra=...)."""
        return {"n": self.n, "terms": self.terms, "algebra": self.algebra}

    # ---- reporting ------------------------------------------------------------------------------
    def _dims_desc(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)}" for name in self._desc_attrs)

    def _dense_weight_numel(self) -> int:
        return self.F.shape[1] * self.F.shape[2] * self.n * self.n * math.prod(self.F.shape[3:])

    def dense_param_count(self) -> int:
        """Parameters of the equivalent dense torch layer (weight + bias)."""
        return self._dense_weight_numel() + (self.bias.numel() if self.bias is not None else 0)

    def weight_build_flops(self) -> int:
        """FLOPs of one build of the dense weight: 2·terms per entry (a multiply-add per term)."""
        return 2 * self.terms * self._dense_weight_numel()

    def extra_repr(self) -> str:
        own = sum(p.numel() for p in self.parameters(recurse=False))
        dense = self.dense_param_count()
        return (
            f"{super().extra_repr()}, n={self.n}, terms={self.terms}, algebra={self.algebra!r}, "
            f"params={own}/{dense} ({own / max(dense, 1):.3f}x dense)"
        )
