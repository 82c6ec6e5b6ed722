"""Independent training runs side by side in worker processes (the recipes' ``--jobs N``).

A small reconstruction network's CPU ops are too short to keep two threads busy: on the demo's 2-core machine
one run with two threads takes as long per step as each of two one-thread runs going at the same time (fastMRI
U-Net, 400 steps: 45 s either way; docs/results/demo_table1.md), so a table of independent rows trains about
twice as fast two rows at a time. Each worker is a fresh (``spawn``) process, because forking a process whose
OpenMP threads have started can hang, and it runs ``torch.set_num_threads(threads)``.

:func:`machine_description` records where a result came from (CPU, cores, GPU, library versions, threads).

Work that needs another's result first is a :class:`Task` with ``after`` (a compressed row waits for its dense
teacher, recipes/table1.py): :func:`run_tasks` starts it as soon as those have finished, in the same pool, so it
fills a worker that independent tasks would leave idle at the end.

Every run is seeded by its own arguments, so a run's result does not depend on which worker ran it or when.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Call", "Task", "default_jobs", "machine_description", "run_calls", "run_tasks", "threads_per_job"]

#: One function call: (positional arguments, keyword arguments).
Call = tuple[Sequence[Any], Mapping[str, Any]]


@dataclass(frozen=True, eq=False)
class Task:
    """``fn(*args, **kwargs)``, started only once every task in ``after`` (earlier in the same list) has finished.
    Tasks compare by identity."""

    fn: Callable[..., Any]
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    after: tuple[Task, ...] = ()


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
    """``[fn(*args, **kwargs) for args, kwargs in calls]``, ``jobs`` calls at a time in worker processes
    (:func:`run_tasks` of independent tasks)."""
    return run_tasks([Task(fn, args, kwargs) for args, kwargs in calls], jobs, threads)


def run_tasks(tasks: Sequence[Task], jobs: int = 1, threads: int | None = None) -> list[Any]:
    """Each task's result, in the order of ``tasks``, running ``jobs`` at a time in worker processes.

    ``jobs`` <= 1 (or a single task) runs them here, in order. Otherwise every ``fn`` and argument must be
    picklable (``fn`` importable by name) and each worker uses ``threads`` torch threads (default: this
    process's threads divided among the jobs, at least one). A free worker takes the first ready task in list
    order, a task that waited on others before one that did not, so follow-up work never queues behind
    independent tasks. The first task that raises stops the tasks not yet started; its exception is raised
    here after the running ones finish.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    position = {id(task): i for i, task in enumerate(tasks)}
    for i, task in enumerate(tasks):
        if any(position.get(id(before), i) >= i for before in task.after):
            name = getattr(task.fn, "__name__", repr(task.fn))
            raise ValueError(f"task {i} ({name}) waits on a task that does not come before it in the list")
    if jobs == 1 or len(tasks) <= 1:
        return [task.fn(*task.args, **task.kwargs) for task in tasks]
    threads = threads or threads_per_job(jobs)
    pool = ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_set_threads, initargs=(threads,))
    results: dict[int, Any] = {}
    waiting = list(range(len(tasks)))
    running: dict[Future, int] = {}
    try:
        while waiting or running:
            ready = [i for i in waiting if all(position[id(before)] in results for before in tasks[i].after)]
            for i in sorted(ready, key=lambda i: not tasks[i].after)[:jobs - len(running)]:
                waiting.remove(i)
                running[pool.submit(tasks[i].fn, *tasks[i].args, **tasks[i].kwargs)] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [results[i] for i in range(len(tasks))]


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
