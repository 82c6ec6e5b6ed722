"""The Kronecker parametrization: a weight tensor stored as factors, W = Σ_t A_t ⊗ F_t.

`KronParametrization` is a `torch.nn.utils.parametrize` parametrization, so a converted layer keeps its
class, its forward and its hooks; only the tensor it reads as `weight` (or `in_proj_weight`, ...) is
computed from the factors. Factors are stored under torch's names:

- learned algebra: `parametrizations.<name>.original0` = A (terms, n, n) and `original1` = F;
- fixed algebra ("complex", "quaternion"): `parametrizations.<name>.original` = F and the buffer
  `parametrizations.<name>.0.A`.

F keeps the weight's rank, (chunks·terms·d0/n, d1/n, *kernel), so `Module.to(memory_format=...)` treats it
like the dense weight (a Conv2d's F is 4-D and can be channels_last). The factorization runs over the
weight's first two dims *as stored*: (out, in) for Linear/Conv, (in, out/groups) for ConvTranspose and
(in, out) for transformers' Conv1D; a transposed Kronecker sum is a Kronecker sum, so the structure is
the same. `chunks` splits dim 0 into equal blocks with factors of their own (the packed q/k/v projection
of nn.MultiheadAttention: one Kronecker sum per projection).

`layer.<name> = W` projects W onto the nearest Kronecker sum (`right_inverse`, float64 SVD). Read from
outside a forward, the weight is a `LinkedWeight`: in-place edits of it (`nn.init.normal_(layer.weight)`,
`layer.weight.data.normal_()`, `layer.weight[0] = v`, `reset_parameters()`) are written back the same way.
Inside a forward (the forward of a converted layer's class, or any module's forward run by `module(x)`), and
while tracing, compiling, exporting or under functorch transforms, it is the plain tensor. The getter decides
this from the reading frame, so converted layers carry no forward hooks and no patched `__setattr__`, and it
is thread-safe. `layer.<name> = nn.Parameter(W)` raises `KronAssignmentError` saying what to do instead.
nn.MultiheadAttention, whose forward reads in_proj_weight up to three times, builds it once per call.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import threading
import types
import weakref

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.utils import parametrize

from kronify.algebra import LEARNED, algebra_matrices, resolve_algebra
from kronify.kron import _kron_weight, check_kron_dims, nearest_kronecker, project_kronecker

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

    @property
    def learned(self) -> bool:
        return self.algebra == LEARNED

    # ---- W from the factors ---------------------------------------------------------------------
    def forward(self, *factors: Tensor) -> Tensor:
        A, F = factors if self.learned else (self.A, factors[0])
        if (self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.is_inference(F)):
            return self.build(A, F)
        key = (A.data_ptr(), F.data_ptr(), A._version, F._version, F.dtype, F.shape)
        if self._cache is not None and self._cache[0] == key and self._cache[2] == self._cache[1]._version:
            return self._cache[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, so it has a version counter
            W = self.build(A, F)
        self._cache = (key, W, W._version, A, F)  # A and F kept: their storage cannot be reused by others
        return W

    def build(self, A: Tensor, F: Tensor) -> Tensor:
        """Σ_t A_t ⊗ F_t per chunk, in F's dtype, accumulated in float32 for half/bfloat16 and under autocast."""
        dtype = F.dtype
        autocast = F.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(F.device.type)
        with torch.autocast(F.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if dtype in _LOW_PRECISION:
                A, F = A.float(), F.float()
            A = A.to(F.dtype)
            t, p = self.terms, F.shape[0] // (self.chunks * self.terms)
            if self.chunks == 1:  # reshapes only: their backward is a view (indexing chunk 0 would copy the grad)
                W = _kron_weight(A.reshape(t, self.n, self.n), F.reshape(t, p, *F.shape[1:]))
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
        if W.is_meta:  # shapes only (a model built on the meta device): no values to fit
            F = W.new_empty(self.terms * self.shape[0] // self.n, self.shape[1] // self.n, *self.shape[2:])
            return (W.new_empty(self.chunks * self.terms, self.n, self.n), F) if self.learned else F
        As, Fs, sq, err2 = [], [], [], []
        for w in W.detach().chunk(self.chunks):
            if self.learned:
                a, f, err = nearest_kronecker(w, self.n, self.terms)
                As.append(a)
            else:
                f, err = project_kronecker(w, algebra_matrices(self.algebra, dtype=torch.float64))
            Fs.append(f.reshape(-1, *f.shape[2:]))
            s = float(w.double().pow(2).sum())
            sq.append(s)
            err2.append(err * err * s)
        self.fit_error = math.sqrt(sum(err2) / sum(sq)) if sum(sq) > 0 else 0.0
        self._cache = None
        F = torch.cat(Fs)
        return (torch.cat(As), F) if self.learned else F

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

    def build_flops(self) -> int:
        """FLOPs of one build of W: 2·terms per entry (a multiply-add per term)."""
        return 2 * self.terms * math.prod(self.shape)

    def config(self) -> dict:
        return {"n": self.n, "terms": self.terms, "algebra": self.algebra}

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        self._cache = None
        return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_cache": None}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, n={self.n}, terms={self.terms}, algebra={self.algebra!r}, chunks={self.chunks}"


class KronAssignmentError(TypeError):
    """Raised for `layer.weight = nn.Parameter(W)` (or a buffer of that name) on a Kronecker-parametrized weight."""


# ---- where a read comes from: no per-call hooks ----------------------------------------------------------
# A read of a Kronecker weight is "inside a forward" when the reading frame is the forward of a converted
# layer's class (or of a class in its MRO; registered by link_weight), or a `forward` called by nn.Module's
# call machinery (another module's forward run by module(x), e.g. a parent reading its child's weight). Such
# reads get the plain built tensor; every other read (hooks, init code, helpers) gets a LinkedWeight. Frames
# are per thread, so this is thread-safe, and it costs nothing per call but the look at the caller's frame.
_FORWARDS: set = set()  # code objects of the forwards of converted layers' classes (and nn.MultiheadAttention's)
_CALLERS = {nn.Module._call_impl.__code__,
            *(c for c in nn.Module._call_impl.__code__.co_consts if isinstance(c, types.CodeType))}
_ONCE: set = set()  # forwards that read a weight several times per call: built once per call (see _read_once)
_ONCE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> {name: (key, lasti, W)}; not in
# the module's __dict__, so deepcopy and pickling never see a built (non-leaf) tensor
_REGISTER = {nn.Module.register_parameter.__code__, nn.Module.register_buffer.__code__}
_local = threading.local()  # plain_reads() depth, per thread


def _codes(cls: type) -> set:
    """The code objects of the `forward`s defined along `cls`'s MRO (through functools.wraps-style wrappers)."""
    found = set()
    for klass in cls.__mro__:
        f = vars(klass).get("forward")
        while f is not None:
            code = getattr(f, "__code__", None)
            if code is not None:
                found.add(code)
            f = getattr(f, "__wrapped__", None)
    return found - {nn.Module.forward.__code__}


_FORWARDS |= _codes(nn.MultiheadAttention)  # reads its out_proj's weight (a converted Linear) in its forward


_NOT_EDITS = {"requires_grad_", "share_memory_", "detach_", "rename_"}
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__iand__", "__idiv__", "__ifloordiv__", "__ilshift__", "__imod__",
                     "__imul__", "__ior__", "__ipow__", "__irshift__", "__isub__", "__itruediv__", "__ixor__"}


class LinkedWeight(Tensor):
    """A Kronecker weight read from outside forward: the built tensor (same values and autograd graph), linked
    to its layer. After an in-place edit of it (a method ending in "_", nn.init.*_, `w[i] = v`, `.data = v`,
    `out=`, `inplace=True`) the edited value is written back, `layer.<name> = edited`, i.e. projected onto the
    nearest Kronecker sum; `.data` is linked too. Every other op returns plain tensors."""

    @classmethod
    def link(cls, W: Tensor, owner: nn.Module, name: str, fresh: bool) -> "LinkedWeight":
        """W as a LinkedWeight: retyped in place when it is a fresh temporary, else a new alias."""
        if fresh:
            W.__class__ = cls  # no alias node in the graph: grad_fn stays what the build made
        else:
            W = W.as_subclass(cls)
        W._kron_owner, W._kron_name = weakref.ref(owner), name
        return W

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        first = args[0] if args else next(iter(kwargs.values()), None)
        if func == Tensor.data.__get__:
            owner = first._kron_owner()
            return out if owner is None else cls.link(out, owner, first._kron_name, fresh=True)
        edited = kwargs.get("out")
        if not isinstance(edited, LinkedWeight):
            name = getattr(func, "__name__", "")
            edits = (name in _IN_PLACE_DUNDERS or func == Tensor.data.__set__ or kwargs.get("inplace") is True
                     or (name.endswith("_") and not name.startswith("_") and name not in _NOT_EDITS))
            edited = first if edits and isinstance(first, LinkedWeight) else None
        if edited is not None:
            edited._write_back()
        return out

    def _write_back(self) -> None:
        owner = self._kron_owner()
        if owner is not None and parametrize.is_parametrized(owner, self._kron_name):
            setattr(owner, self._kron_name, self.detach())

    def __deepcopy__(self, memo):  # a copy is not linked
        return copy.deepcopy(self.detach(), memo)

    def __reduce_ex__(self, protocol):  # pickles as a plain tensor (the link is a weak reference)
        return self.detach().__reduce_ex__(protocol)


def _tracing() -> bool:
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_fx_symbolic_tracing()
            or torch.onnx.is_in_onnx_export() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() > 0)


def _assignment_error(owner: nn.Module, name: str) -> KronAssignmentError:
    return KronAssignmentError(
        f"{type(owner).__mro__[1].__name__}.{name} is Kronecker-parametrized (its factors are in "
        f".parametrizations.{name}), so an nn.Parameter (or buffer) cannot be registered as {name!r}. "
        f"Assign a tensor instead, `layer.{name} = W.detach()`, or edit it in place, "
        f"`with torch.no_grad(): layer.{name}.copy_(W)`: either sets the factors to the nearest Kronecker sum "
        f"to W. To make {name!r} a plain Parameter again, kronify.merge(model) first.")


def _read_once(owner: nn.Module, name: str, fget, frame) -> Tensor:
    """Build a weight once per call of a forward that reads it several times (nn.MultiheadAttention reads
    in_proj_weight up to 3 times: `is None`, `.dtype`, then the projection). The built tensor is reused for the
    later reads of the same running call, recognized by the reading frame (alive, so its id is unique) reading
    from a later instruction; a new call starts from its first read, so it never gets an earlier call's tensor.
    Keyed also on the factors' versions and the grad mode, so an edit or optimizer step in between rebuilds."""
    plist = owner.parametrizations[name]
    key = (id(frame), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
           *((t.data_ptr(), t._version) for t in plist._parameters.values()))
    cache = _ONCE_CACHE.get(owner)
    if cache is None:
        cache = _ONCE_CACHE[owner] = {}
    hit = cache.get(name)
    lasti = frame.f_lasti
    if hit is not None and hit[0] == key and lasti > hit[1]:
        cache[name] = (key, lasti, hit[2])
        return hit[2]
    W = fget(owner)
    cache[name] = (key, lasti, W)
    return W


def _linked_getter(fget, name: str):
    def get(self: nn.Module) -> Tensor:
        if torch.compiler.is_compiling():
            return fget(self)
        frame = sys._getframe(1)
        code = frame.f_code
        if code in _ONCE and not _tracing():
            return _read_once(self, name, fget, frame)
        W = fget(self)
        if code in _FORWARDS:
            return W
        back = frame.f_back  # another module's forward run by module(x) (a parent reading its child's weight)
        if code.co_name == "forward" and back is not None and back.f_code in _CALLERS:
            return W
        # not inside a forward: a linked read unless plain reads were asked for
        if code in _REGISTER:
            raise _assignment_error(self, name)
        if type(W) is not Tensor or getattr(_local, "depth", 0) or _tracing():
            return W
        return LinkedWeight.link(W, self, name, fresh=W.grad_fn is not None and not parametrize._cache_enabled)

    get._kron_linked = True
    return get


@contextlib.contextmanager
def plain_reads():
    """Within it (in this thread), reads of Kronecker weights return plain tensors, as inside a forward."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def link_weight(owner: nn.Module, name: str) -> None:
    """Make `owner.<name>` (just parametrized) a linked read outside forward: the reading property (on the class
    torch made for this module) wrapped, and the forwards of the owner's class registered as plain readers.
    No hook and no __setattr__. A tensor under another parametrization (owner a ParametrizationList) is left
    as it is."""
    if isinstance(owner, parametrize.ParametrizationList):
        return
    cls = type(owner)
    prop = vars(cls)[name]
    if not getattr(prop.fget, "_kron_linked", False):
        setattr(cls, name, property(_linked_getter(prop.fget, name), prop.fset))
    _FORWARDS.update(_codes(cls))


def share_parametrization(owner: nn.Module, name: str, plist: parametrize.ParametrizationList) -> None:
    """Make `owner.<name>` (a head tied to an embedding) read the Kronecker weight of another layer's
    ParametrizationList: one set of factors for both, as the dense tie had one Parameter for both."""
    parametrize.register_parametrization(owner, name, plist[0], unsafe=True)
    owner.parametrizations[name] = plist
    link_weight(owner, name)


def unlink(module: nn.Module) -> None:
    """Drop what link_weight / build_once_per_call left on a layer made plain again: the per-call build cache
    (nothing else: there are no hooks; the linked property lives on torch's parametrized class, which
    remove_parametrizations deletes)."""
    _ONCE_CACHE.pop(module, None)


def build_once_per_call(module: nn.Module) -> None:
    """Build `module`'s Kronecker weights once per call of its forward, which reads them several times
    (nn.MultiheadAttention reads in_proj_weight three times): its forward's code is registered with the
    readers whose repeated reads share one build (`_read_once`). No hook; nothing per call but the lookup."""
    _ONCE.update(_codes(type(module)))


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
