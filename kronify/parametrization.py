"""The Kronecker parametrization: a weight tensor stored as factors, W = Σ_t A_t ⊗ F_t.

`KronParametrization` is a `torch.nn.utils.parametrize` parametrization: a converted layer keeps its class, forward
and hooks, and only the tensor it reads as `weight` (or `in_proj_weight`, ...) is built from the factors, stored
under torch's names: `parametrizations.<name>.original0` = A (terms, n, n) and `original1` = F for the learned
algebra; `parametrizations.<name>.original` = F and the buffer `parametrizations.<name>.0.A` for a fixed one
("complex", "quaternion").

F keeps the weight's rank, (chunks·terms·d0/n, d1/n, *kernel), so `Module.to(memory_format=...)` treats it like the
dense weight. The factorization runs over the weight's first two dims as stored ((in, out/groups) for
ConvTranspose, (in, out) for transformers' Conv1D): a transposed Kronecker sum is one too. `chunks` splits dim 0
into blocks with factors of their own (nn.MultiheadAttention's packed q/k/v). `layer.<name> = W` projects W onto
the nearest Kronecker sum (`right_inverse`); how the weight is read is `kronify.linked_weight`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kronify.algebra import LEARNED, algebra_matrices, resolve_algebra
from kronify.kron import _kron_weight, check_kron_dims
from kronify.linked_weight import KronAssignmentError, LinkedWeight, link_weight, plain_reads
from kronify.nearest import kronecker_fit, project_kronecker
from kronify.weight_memory import WeightMemory

__all__ = ["KronAssignmentError", "KronParametrization", "LinkedWeight", "is_kron", "kron_param_count",
           "kron_parametrizations", "own_kron_parametrizations", "plain_reads", "share_parametrization"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def kron_param_count(shape: tuple[int, ...], n: int, terms: int, *, chunks: int = 1, learned: bool = True) -> int:
    """Parameters of the factors of a weight of `shape`: A (if learned) and F, for `chunks` blocks of dim 0."""
    numel = math.prod(shape)
    return (chunks * terms * n * n if learned else 0) + terms * numel // (n * n)


class KronParametrization(nn.Module):
    """W = Σ_t A_t ⊗ F_t (per chunk of dim 0) for a weight of `shape`; see the module docstring.

    In eval mode, outside autograd, tracing and compiling, the built weight is cached and reused until a
    factor changes (keyed on storage and version counters; dropped by train()/eval()/to()). Low-precision
    factors and autocast build the weight with float32 accumulation.
    """

    def __init__(self, shape: tuple[int, ...], n: int, terms: int | None = None, algebra: str = LEARNED,
                 chunks: int = 1) -> None:
        super().__init__()
        self.terms = resolve_algebra(algebra, n, terms)
        if shape[0] % chunks:
            raise ValueError(f"weight dim 0 = {shape[0]} does not split into {chunks} chunks")
        check_kron_dims(shape[0] // chunks, shape[1], n, f"weight of shape {tuple(shape)}")
        self.shape, self.n, self.algebra, self.chunks = tuple(shape), n, algebra, chunks
        if algebra != LEARNED:
            self.register_buffer("A", algebra_matrices(algebra).repeat(chunks, 1, 1))
        self.fit_error: float | None = None  # relative Frobenius error of the last right_inverse
        self.param_order: list[str] = []  # the owner's parameter names before conversion (merge restores it)
        self._cache: tuple | None = None
        self._memory = WeightMemory()  # CPU builds reuse it once the previous weight is gone

    @property
    def learned(self) -> bool:
        return self.algebra == LEARNED

    # ---- W from the factors ---------------------------------------------------------------------
    def forward(self, *factors: Tensor) -> Tensor:
        A, F = factors if self.learned else (self.A, factors[0])
        if (self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.is_inference(F)):
            return self.build(A, F, self._memory)
        key = (A.data_ptr(), F.data_ptr(), A._version, F._version, F.dtype, F.shape)
        if self._cache is not None and self._cache[0] == key and self._cache[2] == self._cache[1]._version:
            return self._cache[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, so it has a version counter
            W = self.build(A, F)
        self._cache = (key, W, W._version, A, F)  # A and F kept: their storage cannot be reused by others
        return W

    def build(self, A: Tensor, F: Tensor, memory: WeightMemory | None = None) -> Tensor:
        """Σ_t A_t ⊗ F_t per chunk, in F's dtype, accumulated in float32 for half/bfloat16 and under autocast;
        a large unchunked weight is built in `memory` when that is free (`kronify.weight_memory`)."""
        dtype = F.dtype
        autocast = F.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(F.device.type)
        with torch.autocast(F.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if dtype in _LOW_PRECISION:
                A, F = A.float(), F.float()
            A = A.to(F.dtype)
            t, p = self.terms, F.shape[0] // (self.chunks * self.terms)
            if self.chunks == 1:  # reshapes only: their backward is a view (indexing chunk 0 would copy the grad)
                W = _kron_weight(A.reshape(t, self.n, self.n), F.reshape(t, p, *F.shape[1:]), memory)
            else:
                Fc = F.reshape(self.chunks, t, p, *F.shape[1:])
                Ac = A.reshape(self.chunks, t, self.n, self.n)
                W = torch.cat([_kron_weight(a, f) for a, f in zip(Ac, Fc)])
        return W.to(dtype)

    # ---- factors from W ----------------------------------------------------------------------------
    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        """The factors of the nearest Kronecker sum to W (exact at terms = n²); sets `fit_error`."""
        if tuple(W.shape) != self.shape:
            raise ValueError(f"expected a weight of shape {self.shape}, got {tuple(W.shape)}")
        factors = self.empty_factors(W) if W.is_meta else self.fit(W)[0]
        self._cache = None
        return tuple(factors) if self.learned else factors[0]

    def fit(self, W: Tensor) -> tuple[list[Tensor], float]:
        """([A, F] or [F]) of the nearest Kronecker sum to W per chunk (float64 fits, streamed; factors in W's
        dtype) and ‖W‖²_F; sets `fit_error`, the relative Frobenius error over all chunks."""
        As, Fs, sq, err2 = [], [], [], []
        for w in W.detach().chunk(self.chunks):
            if self.learned:
                a, f, err, s = kronecker_fit(w, self.n, self.terms)
                As.append(a)
            else:
                f, err, s = project_kronecker(w, algebra_matrices(self.algebra, dtype=torch.float64))
            Fs.append(f.reshape(-1, *f.shape[2:]))
            sq.append(s)
            err2.append(err * err * s)
        self.fit_error = math.sqrt(sum(err2) / sum(sq)) if sum(sq) > 0 else 0.0
        F = Fs[0] if len(Fs) == 1 else torch.cat(Fs)
        return ([As[0] if len(As) == 1 else torch.cat(As)] if self.learned else []) + [F], sum(sq)

    def empty_factors(self, like: Tensor) -> list[Tensor]:
        """Uninitialised ([A, F] or [F]) in `like`'s dtype and device (meta: shapes only)."""
        F = like.new_empty(self.terms * self.shape[0] // self.n, self.shape[1] // self.n, *self.shape[2:])
        return ([like.new_empty(self.chunks * self.terms, self.n, self.n)] if self.learned else []) + [F]

    def cold_start(self, factors: list[Tensor], std: float) -> None:
        """Fresh factors (in place) whose W has standard deviation `std`: each (a, b) fibre of A has unit
        norm (random for "learned", the algebra's pattern otherwise) and F is uniform, rescaled to `std`."""
        if factors[-1].is_meta:
            return
        with torch.no_grad():
            F = factors[-1]
            if self.learned:
                A = factors[0]
                fibres = A.normal_().view(self.chunks, self.terms, self.n, self.n)
                fibres.div_(fibres.norm(dim=1, keepdim=True).clamp_min(1e-12))
            else:
                A = self.A
            F.uniform_(-1, 1)
            W = self.build(A, F).double()
            got = float(W.std()) if W.numel() > 1 else float(W.abs().sum())
            F.mul_(std / got if got > 0 else 0.0)
        self._cache = None
        self.fit_error = None

    def config(self) -> dict:
        return {"n": self.n, "terms": self.terms, "algebra": self.algebra}

    def clear_cache(self) -> None:
        """Drop the eval-mode weight and the memory kept for training builds."""
        self._cache = None
        self._memory.release()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        self.clear_cache()
        return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_cache": None}

    def __setstate__(self, state: dict) -> None:  # pickles made before `_memory` existed lack it
        super().__setstate__({"_memory": WeightMemory(), **state})

    def extra_repr(self) -> str:
        return f"shape={self.shape}, n={self.n}, terms={self.terms}, algebra={self.algebra!r}, chunks={self.chunks}"


def share_parametrization(owner: nn.Module, name: str, plist: parametrize.ParametrizationList) -> None:
    """Make `owner.<name>` (a head tied to an embedding) read the Kronecker weight of another layer's
    ParametrizationList: one set of factors for both, as the dense tie had one Parameter for both."""
    parametrize.register_parametrization(owner, name, plist[0], unsafe=True)
    owner.parametrizations[name] = plist
    link_weight(owner, name)


def kron_parametrizations(model: nn.Module):
    """Yield (owner module name, owner, tensor name, KronParametrization) for every Kronecker tensor
    below `model` (an owner may be a ParametrizationList: a Kronecker original under another parametrization)."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                if isinstance(plist[0], KronParametrization):
                    yield name, module, tensor_name, plist[0]


def own_kron_parametrizations(module: nn.Module) -> list[KronParametrization]:
    """The Kronecker parametrizations of `module`'s own tensors (nested under another parametrization too)."""
    if not parametrize.is_parametrized(module):
        return []
    found = []
    for plist in module.parametrizations.values():
        found += [plist[0]] if isinstance(plist[0], KronParametrization) else []
        found += [p for _, _, _, p in kron_parametrizations(plist)]
    return found


def is_kron(module: nn.Module) -> bool:
    """True when one of `module`'s own tensors is Kronecker-parametrized (not counting its children)."""
    return bool(own_kron_parametrizations(module))
