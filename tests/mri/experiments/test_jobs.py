"""kronify.mri.experiments.jobs: calls run side by side in worker processes give the in-process results, in order, with the
requested torch threads, and a failing call's error reaches the caller; a task that waits on others starts only
after they finished, whatever they returned."""

from __future__ import annotations

import math
import operator

import pytest
import torch

from kronify.mri.experiments.jobs import Task, default_jobs, run_calls, run_tasks


def test_results_come_back_in_call_order_from_worker_processes():
    calls = [((a, b), {}) for a, b in [(1, 2), (30, 4), (500, 6), (7, 8000)]]
    assert run_calls(operator.add, calls, jobs=2) == [3, 34, 506, 8007] == run_calls(operator.add, calls, jobs=1)


def test_each_worker_uses_the_requested_torch_threads():
    calls = [((), {})] * 2
    assert run_calls(torch.get_num_threads, calls, jobs=2, threads=1) == [1, 1]
    assert run_calls(torch.get_num_threads, calls, jobs=1) == [torch.get_num_threads()] * 2  # in this process


def test_a_failing_call_raises_its_own_error():
    with pytest.raises(ValueError, match="math domain error"):
        run_calls(math.sqrt, [((4.0,), {}), ((-1.0,), {}), ((9.0,), {})], jobs=2)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_task_starts_only_after_the_tasks_it_waits_on(tmp_path, jobs):
    # each reader needs the file its writer makes; the writers sleep first, so a reader started early would fail
    files = [tmp_path / f"{k}.txt" for k in range(3)]
    writers = [Task(_sleep_then_write, (f, f"teacher {k}")) for k, f in enumerate(files)]
    readers = [Task(f.read_text, after=(w,)) for f, w in zip(files, writers)]
    independent = [Task(operator.mul, (k, 10)) for k in range(3)]
    results = run_tasks([*writers, *independent, *readers], jobs=jobs)
    assert results == [9, 9, 9, 0, 10, 20, "teacher 0", "teacher 1", "teacher 2"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_task_after_an_empty_result_still_runs(jobs):
    # a training run returns {} on a non-zero DDP rank; the compression after it must run there too (table1 DDP)
    empty = Task(dict)
    assert run_tasks([empty, Task(operator.add, (1, 2), after=(empty,))], jobs=jobs) == [{}, 3]


def test_a_task_must_come_after_the_tasks_it_waits_on():
    first = Task(operator.add, (1, 2))
    with pytest.raises(ValueError, match=r"task 0 \(sqrt\) waits on a task that does not come before it"):
        run_tasks([Task(math.sqrt, (4.0,), after=(first,)), first], jobs=2)
    with pytest.raises(ValueError, match="task 0"):
        run_tasks([Task(math.sqrt, (4.0,), after=(first,))], jobs=1)  # not in the list at all


def test_jobs_must_be_positive_and_default_jobs_never_exceed_the_torch_threads(monkeypatch):
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_calls(operator.add, [((1, 2), {})], jobs=0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert default_jobs(2) == 1 and default_jobs(0) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_jobs(2) == 2


def test_threads_per_job_shares_this_process_threads(monkeypatch):
    from kronify.mri.experiments.jobs import threads_per_job

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert [threads_per_job(j) for j in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def _sleep_then_write(path, text: str) -> int:
    import time

    time.sleep(0.3)
    return path.write_text(text)
