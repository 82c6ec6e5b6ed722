"""Reads of a Kronecker weight: plain inside a forward, linked outside it, with no per-call hooks.

Read from outside a forward, a Kronecker-parametrized weight (`kronify.parametrization`) is a `LinkedWeight`:
in-place edits of it (`nn.init.normal_(layer.weight)`, `layer.weight.data.normal_()`, `layer.weight[0] = v`,
`reset_parameters()`) are written back, i.e. projected onto the nearest Kronecker sum. Inside a forward (the
forward of a converted layer's class, or any module's forward run by `module(x)`), and while tracing, compiling,
exporting or under functorch transforms, it is the plain tensor. The getter decides this from the reading frame,
so converted layers carry no forward hooks and no patched `__setattr__`, and it is thread-safe.
`layer.<name> = nn.Parameter(W)` raises `KronAssignmentError` saying what to do instead. nn.MultiheadAttention,
whose forward reads in_proj_weight up to three times, builds it once per call.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import threading
import types
import weakref

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

__all__ = ["KronAssignmentError", "LinkedWeight", "build_once_per_call", "link_weight", "plain_reads", "unlink"]


class KronAssignmentError(TypeError):
    """Raised for `layer.weight = nn.Parameter(W)` (or a buffer of that name) on a Kronecker-parametrized weight."""


# ---- where a read comes from: the reading frame (per thread), no per-call hooks ------------------------------
# "Inside a forward": the frame is the forward of a converted layer's class (or of a class in its MRO; registered
# by link_weight), or a `forward` called by nn.Module's call machinery (a parent reading its child's weight).
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
    cache = _ONCE_CACHE.setdefault(owner, {})
    hit = cache.get(name)
    lasti = frame.f_lasti
    if hit is not None and hit[0] == key and lasti > hit[1]:
        cache[name] = (key, lasti, hit[2])
        return hit[2]
    W = fget(owner)
    cache[name] = (key, lasti, W)
    return W


def _hooked(*modules: nn.Module) -> bool:
    """Whether nn.Module's call would run hooks for any of `modules` (the test by which it takes its fast path)."""
    g = _module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                                       or m._backward_pre_hooks for m in modules))


def _built(fget, name: str):
    """torch's getter, or, when the Kronecker parametrization is the only one on the tensor, parametrize.cached()
    is off and no module hook would run, that parametrization's forward called directly on the factors: the same
    tensor without the two nn.Module calls between them, 40-60 µs a read when a big op has just evicted the
    interpreter's data from the caches (5-10 µs when they are warm)."""
    def read(owner: nn.Module) -> Tensor:
        plist = owner._modules["parametrizations"]._modules[name]
        if len(plist) != 1 or parametrize._cache_enabled or _hooked(plist, plist._modules["0"]):
            return fget(owner)
        return plist._modules["0"].forward(*plist._parameters.values())  # the factors, as torch registered them

    return read


def _linked_getter(fget, name: str):
    fget = _built(fget, name)

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


def unlink(module: nn.Module) -> None:
    """Drop the per-call build cache of a layer made plain again (the linked property lives on torch's
    parametrized class, which remove_parametrizations deletes; there are no hooks)."""
    _ONCE_CACHE.pop(module, None)


def build_once_per_call(module: nn.Module) -> None:
    """Build `module`'s Kronecker weights once per call of its forward, which reads them several times
    (nn.MultiheadAttention: in_proj_weight three times); its forward's code is registered (`_read_once`)."""
    _ONCE.update(_codes(type(module)))
