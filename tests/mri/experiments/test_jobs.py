"""kronify.mri.experiments.jobs: calls run side by side in worker processes give the in-process results, in order, with the
requested torch threads, and a failing call's error reaches the caller."""

from __future__ import annotations

import math
import operator

import pytest
import torch

from kronify.mri.experiments.jobs import default_jobs, run_calls


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
