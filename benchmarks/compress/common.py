"""Helpers shared by the compression study and the design-choice measurements: compressing a trained model,
distilling it, statistics, per-run result caching and the command line and result files both scripts share."""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronify
from benchmarks.compress.tasks import OUT, TASKS, Task

CALIBRATION_BATCHES = 16


@functools.cache
def kronify_source() -> str:
    """Short hash of kronify's Python sources (mri excluded), to tell which code produced a cached run."""
    root = Path(kronify.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "mri" not in p.parts):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def n_params(model: nn.Module) -> int:
    """Parameters the model holds (Kronecker factors for converted layers), each shared tensor once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def compress(teacher: nn.Module, task: Task, *, seed: int = 0, calibrate: bool = False,
             calibration_config: Any = None, **convert_kw: Any) -> tuple[nn.Module, Any]:
    """A warm-started Kronecker copy of `teacher` (the teacher is untouched) and its ConversionReport;
    calibrate=True fits on `CALIBRATION_BATCHES` unlabelled training batches drawn with `seed`."""
    student = copy.deepcopy(teacher)
    if calibrate:
        convert_kw["calibration"] = task.calibration_batches(CALIBRATION_BATCHES, seed)
        if calibration_config is not None:
            convert_kw["calibration_config"] = calibration_config
    report = kronify.convert(student, warm_start=True, **convert_kw)
    return student.eval(), report


def scratch(task: Task, seed: int, **convert_kw: Any) -> nn.Module:
    """A freshly built model, converted with a cold start and trained with labels for the dense steps."""
    torch.manual_seed(seed)
    model = task.build()
    kronify.convert(model, **convert_kw)
    return task.train(model, task.dense_steps, seed)


def distill(student: nn.Module, teacher: nn.Module, task: Task, fraction: float, seed: int, **kw: Any) -> nn.Module:
    """kronify.distill on unlabelled training inputs for `fraction` of the dense steps (at least 1 step)."""
    steps = max(1, round(fraction * task.dense_steps))
    kronify.distill(student, teacher, task.unlabelled_batches(seed), steps=steps, seed=seed, progress=False, **kw)
    return student.eval()


def layer_errors(report: Any) -> dict[str, float | None]:
    """Median and mean over converted layers of the held-out output error and of the weight-only fit's."""
    out: dict[str, float | None] = {}
    rows = [r for r in report.rows if r.status == "converted"]
    for key in ("output_error", "weight_fit_error", "warm_start_error"):
        vals = [float(getattr(r, key)) for r in rows if getattr(r, key, None) is not None]
        out[f"{key}_median"] = statistics.median(vals) if vals else None
        out[f"{key}_mean"] = statistics.fmean(vals) if vals else None
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_test(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired t-test (scipy.stats.ttest_rel) of a vs b over seeds: mean difference a - b and p-value."""
    from scipy import stats

    diff = [x - y for x, y in zip(a, b)]
    p = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 and any(d != diff[0] for d in diff) else None
    return {"test": "ttest_rel", "n": len(a), "mean_diff": statistics.fmean(diff), "p": p}


def welch_test(a: list[float], b: list[float]) -> dict[str, Any]:
    """Welch's t-test (unequal variances) of a vs b: mean difference and p-value."""
    from scipy import stats

    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if len(a) > 1 and len(b) > 1 else None
    return {"test": "welch", "n": [len(a), len(b)], "mean_diff": statistics.fmean(a) - statistics.fmean(b),
            "p": None if p != p else p}


class Cache:
    """One JSON file per (task, run, seed) under `root`, so that an interrupted or partial study resumes."""

    def __init__(self, root: Path, fresh: bool = False) -> None:
        self.root, self.fresh = root, fresh
        root.mkdir(parents=True, exist_ok=True)

    def path(self, task: str, run: str, seed: int) -> Path:
        return self.root / f"{task}__{run.replace('/', '_')}__s{seed}.json"

    def get(self, task: str, run: str, seed: int) -> dict | None:
        path = self.path(task, run, seed)
        return None if self.fresh or not path.exists() else json.loads(path.read_text())

    def run(self, task: str, run: str, seed: int, fn: Callable[[], dict]) -> dict:
        """The cached record, or fn()'s (metric, params, ...) with its wall seconds, written to the cache."""
        hit = self.get(task, run, seed)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        record = {"task": task, "run": run, "seed": seed, **fn()}
        record["seconds"] = time.perf_counter() - t0
        record["kronify_source"] = kronify_source()
        self.path(task, run, seed).write_text(json.dumps(record, indent=1) + "\n")
        print(f"  {task:11s} {run:28s} seed {seed}: metric {record.get('metric')}  "
              f"params {record.get('params')}  {record['seconds']:.1f} s", flush=True)
        return record

    def runs(self, task: str, run: str, seeds: list[int], fn: Callable[[int], dict], only: str = "") -> list[dict]:
        """Records of `run` for each seed: computed (or read from the cache) where the regex `only` matches
        the run's name, else only those already in the cache."""
        if not re.search(only, run):
            return [r for s in seeds if (r := self.get(task, run, s)) is not None]
        return [self.run(task, run, s, functools.partial(fn, s)) for s in seeds]


def fmt(x: float | None, digits: int = 3) -> str:
    """x to `digits` decimals, or a dash for a missing value."""
    return "—" if x is None else f"{x:.{digits}f}"


def parser(doc: str, name: str, *, seeds: int, runs_on: str = "the run's name") -> argparse.ArgumentParser:
    """The options both scripts take: --tasks, --seeds, --out (default OUT/name), --threads, --runs, --fresh."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--out", type=Path, default=OUT / name)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="", help=f"regex on {runs_on}: compute only the runs it matches "
                    "(others: from the cache)")
    ap.add_argument("--fresh", action="store_true", help="recompute cached runs")
    return ap
