"""Helpers shared by the benchmarks: machine description, interleaved timing, ratios, result files."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from scipy.stats import binom, t

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    """1/5/15-minute load averages (None where the OS has none): other processes inflate wall-clock times."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine(**extra: Any) -> dict:
    """What a result depends on (CPU, threads, OpenMP wait policy, versions, load at start), plus `extra` fields
    (which win)."""
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
        **extra,
    }


def interleaved(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each fn (one list per fn, in time order), timed alternately in ABBA order
    after `warmup` calls each, so that drift in the machine's load hits every fn equally."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return times


def ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """The ratios of same-repeat timings num/den, sorted."""
    return sorted(a / b for a, b in zip(times[num], times[den]))


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of the ratio of same-repeat timings num/den: robust to load drift."""
    return statistics.median(ratios(times, num, den))


def ratio_ci(times: dict[str, list[float]], num: str, den: str, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of `ratio`'s median (order statistics of the same-repeat ratios, whose
    count below the median is Binomial(repeats, 1/2); from 6 repeats on it covers `level`, below that it is the
    range): whether a median above a target is more than noise."""
    r = ratios(times, num, den)
    k = max(int(binom.ppf((1 - level) / 2, len(r), 0.5)), 1)  # P(count below ≤ k - 1) ≤ (1 - level) / 2
    return r[k - 1], r[len(r) - k]


def replicate_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Geometric mean of per-process ratios and its Student-t confidence interval (on their logs).

    A fresh process lands the allocator's heap, and so a run's page faults, somewhere new: steps within one process
    share that state, processes do not. The processes are the independent replicates, so this, not an interval of
    one process's steps, says whether a mean ratio above or below a target is more than noise. One value: no
    interval (nan, nan)."""
    logs = [math.log(v) for v in values]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    half = t.ppf((1 + level) / 2, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def replicated(rows: list[dict], keys: Sequence[str], with_ci: Sequence[str]) -> dict:
    """Ratios over processes (one row each): for every key the processes' values (`<key>_per_process`) and their
    geometric mean (`<key>`); for the keys in `with_ci` also a t-interval over processes (`<key>_ci95`; one process:
    the interval its row carries, from its repeats)."""
    out = {}
    for key in keys:
        out[f"{key}_per_process"] = [r[key] for r in rows]
        out[key], lo, hi = replicate_ci(out[f"{key}_per_process"])
        if key in with_ci:
            out[f"{key}_ci95"] = (lo, hi) if len(rows) > 1 else tuple(rows[0].get(f"{key}_ci95", (lo, hi)))
    return out


def run_workers(module: str, args: Sequence[str], processes: int, later_args: Sequence[str] = ()) -> list[Any]:
    """What each of `processes` fresh `python -m module *args --worker-out FILE` runs writes to FILE (JSON), run one
    after another from the repo root (`later_args` added from the second on): processes as replicates, see
    `replicate_ci`."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        for k in range(processes):
            cmd = [sys.executable, "-m", module, *args, "--worker-out", str(out), *(later_args if k else ())]
            subprocess.run(cmd, check=True, cwd=RESULTS.parent.parent)
            results.append(json.loads(out.read_text()))
    return results


def best_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """min(num) / min(den): the fastest run of each, least inflated by other processes' load."""
    return min(times[num]) / min(times[den])


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Median milliseconds per fn."""
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def write_results(out: Path, stem: str, result: dict, markdown: str) -> None:
    """Write out/stem.json and out/stem.md, and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
