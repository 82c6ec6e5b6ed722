"""Independent training runs side by side in worker processes (the recipes' ``--jobs N``).

A small reconstruction network's CPU ops are too short to keep two threads busy: on the demo's 2-core machine
one run with two threads takes as long per step as each of two one-thread runs going at the same time (fastMRI
U-Net, 400 steps: 45 s either way; docs/results/demo_table1.md), so a table of independent rows trains about
twice as fast two rows at a time. Each worker is a fresh (``spawn``) process, because forking a process whose
OpenMP threads have started can hang, and it runs ``torch.set_num_threads(threads)``.

:func:`machine_description` records where a result came from (CPU, cores, GPU, library versions, threads).

Every run is seeded by its own arguments, so a run's result does not depend on which worker ran it or when.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = ["Call", "default_jobs", "machine_description", "run_calls", "threads_per_job"]

#: One function call: (positional arguments, keyword arguments).
Call = tuple[Sequence[Any], Mapping[str, Any]]


def default_jobs(preferred: int) -> int:
    """``preferred`` runs at a time, but no more than the threads torch would use (``OMP_NUM_THREADS``, else
    the cores), so that side-by-side runs never oversubscribe what one run would have used."""
    return max(1, min(int(preferred), torch.get_num_threads()))


def threads_per_job(jobs: int) -> int:
    """The torch threads each of ``jobs`` side-by-side runs gets: this process's threads shared out, at least 1."""
    return max(1, torch.get_num_threads() // jobs)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_calls(fn: Callable[..., Any], calls: Sequence[Call], jobs: int = 1, threads: int | None = None) -> list[Any]:
    """``[fn(*args, **kwargs) for args, kwargs in calls]``, ``jobs`` calls at a time in worker processes.

    ``jobs`` <= 1 (or a single call) runs them here, in order. Otherwise ``fn`` and every argument must be
    picklable (``fn`` importable by name) and each worker uses ``threads`` torch threads (default: this
    process's threads divided among the jobs, at least one). Results come back in the order of ``calls``;
    the first call that raises stops the calls not yet started and its exception is raised here after the
    running ones finish.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(calls) <= 1:
        return [fn(*args, **kwargs) for args, kwargs in calls]
    threads = threads or threads_per_job(jobs)
    pool = ProcessPoolExecutor(min(jobs, len(calls)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_set_threads, initargs=(threads,))
    try:
        futures = [pool.submit(fn, *args, **kwargs) for args, kwargs in calls]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def machine_description() -> str:
    """CPU model, usable cores, GPU and library versions, for recording where a result came from."""
    import pytorch_lightning as pl

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {cores} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"pytorch_lightning {pl.__version__}, {torch.get_num_threads()} torch threads")
