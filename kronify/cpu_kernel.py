"""kronify's fused CPU kernel for Kronecker weights in training, compiled on first use.

Training on CPU rebuilds every Kronecker weight W = Σ_t A_t ⊗ F_t at each step, forward and backward. Built from
torch ops, that is several passes over |W|-sized buffers (a matmul, a permuting copy, and the same again for the
gradient), which show in a small layer's step (10-19 % of a 512-wide linear's at batch 1). The kernel in
`csrc/kron_cpu.cpp` writes W in one pass and reads its gradient in one pass: forward + backward of the build took
0.61-0.92x the torch ops' time in the layer benchmark, at every shape that takes it, on 2 CPU cores (docs/kronify.md,
"The fused CPU kernel").

It serves weights of 2¹⁷ entries or more (`kronify.kron`; below that a layer's step was faster with torch ops).
It is compiled with torch's C++ extension tools the first time a CPU training step builds such a weight: about 30 s
once, then loaded from torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions).
Inference, merge, conversion and GPU training never compile it. Without a C++ compiler or ninja, kronify warns
once and uses the torch ops. Set KRONIFY_CPU_KERNEL=0 to never compile or use it; `disabled()` switches it off
for a block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["ENV_VAR", "disabled", "enabled", "ops"]

ENV_VAR = "KRONIFY_CPU_KERNEL"
SOURCE = Path(__file__).with_name("csrc") / "kron_cpu.cpp"

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}  # "ops": the module, or None once a build failed or was disabled


def enabled() -> bool:
    """False when KRONIFY_CPU_KERNEL is 0, false, off or no."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def ops() -> ModuleType | None:
    """The compiled kernel (`kron_forward`, `kron_backward`), built on the first call of the process;
    None when disabled or when it cannot be built (then one warning says why)."""
    if "ops" not in _loaded:
        with _lock:
            if "ops" not in _loaded:
                _loaded["ops"] = _build() if enabled() else None
    return _loaded["ops"]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block every build uses torch ops, as where the kernel cannot be built (for A/B timings and
    debugging). Process-wide: other threads' builds are affected too."""
    missing, kept = "ops" not in _loaded, _loaded.get("ops")
    _loaded["ops"] = None
    try:
        yield
    finally:
        if missing:
            _loaded.pop("ops", None)
        else:
            _loaded["ops"] = kept


def _simd_flags() -> list[str]:
    """AVX2 + FMA where torch found them (x86; 1.5-1.7x faster than SSE2 code in a prototype here), else the
    compiler's baseline. The extension's name carries the choice, so machines sharing a cache never load the wrong
    build."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma"]
    return []


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """PATH with the ninja pip package's binary first while torch builds (a venv's bin/ is on PATH only when
    activated); restored afterwards."""
    try:
        import ninja
    except ImportError:
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build() -> ModuleType | None:
    try:
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on CPU-only machines
        try:
            from torch.utils import cpp_extension
        finally:
            quiet.setLevel(level)
        simd = _simd_flags()
        with _ninja_on_path():
            if not cpp_extension.is_ninja_available():
                raise RuntimeError("ninja is not installed (pip install ninja)")
            return cpp_extension.load(
                name="kronify_kron_cpu" + ("_avx2" if simd else ""),
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-fopenmp", *simd],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as err:  # a missing compiler, headers or ninja: fall back to torch ops, never fail training
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"kronify: could not build its CPU kernel ({type(err).__name__}: {reason}); CPU training builds "
            f"Kronecker weights with torch ops, 1.1-1.6x slower per build. Set {ENV_VAR}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
