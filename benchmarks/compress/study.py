"""Compressing a trained network to about half its parameters: weight-only vs calibrated warm start, each
distilled on unlabelled inputs for 1/5/20 % of the dense training steps, against a Kronecker model trained from
scratch with labels, and a per-layer `budget=0.5` against uniform n=2.

    python -m benchmarks.compress.study [--tasks digits_cnn,shapes_cnn,tiny_bert] [--seeds 3]
        [--out out/compress/study] [--runs REGEX] [--fresh]

Each (task, run, seed) is cached under OUT/runs/, so a rerun only adds what is missing.
Distillation: kronify.distill defaults (loss "auto" = MSE on logits, lr 1e-3, warm-up 5 %, cosine, BN running
statistics frozen) on augmented unlabelled training inputs, batch size as in dense training.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks._common import machine, write_results
from benchmarks.compress import common
from benchmarks.compress.common import Cache, compress, distill, fmt, layer_errors, n_params
from benchmarks.compress.tasks import TASKS, Task

FRACTIONS = (0.01, 0.05, 0.20)


def _record(task: Task, model: nn.Module, steps: int, report: Any = None, **extra: Any) -> dict:
    rec = {"metric": task.metric(model), "params": n_params(model), "steps": steps, **extra}
    if report is not None:
        rec.update(layer_errors(report))
    return rec


class TaskStudy:
    """The runs of one task; warm starts are computed once per (kind, seed) and copied for each distillation."""

    def __init__(self, task: Task, seeds: list[int], cache: Cache, runs: str = "") -> None:
        self.task, self.seeds, self.cache, self.runs = task, seeds, cache, runs
        self.teacher = task.trained(0)
        self.starts: dict[tuple[str, int], tuple[nn.Module, Any, float]] = {}

    def start(self, kind: str, seed: int) -> tuple[nn.Module, Any, float]:
        """(model, report, seconds) of warm start `kind` ("weight", "calib", "budget", "budget calib")."""
        if (kind, seed) not in self.starts:
            t0 = time.perf_counter()
            size = {"budget": 0.5} if kind.startswith("budget") else {"n": 2}
            model, report = compress(self.teacher, self.task, seed=seed, calibrate=kind.endswith("calib"), **size)
            self.starts[kind, seed] = (model, report, time.perf_counter() - t0)
        return self.starts[kind, seed]

    def zero_step(self, kind: str, seed: int) -> dict:
        model, report, seconds = self.start(kind, seed)
        return _record(self.task, model, 0, report, convert_seconds=seconds)

    def distilled(self, kind: str, fraction: float, seed: int) -> dict:
        model = copy.deepcopy(self.start(kind, seed)[0])
        t0 = time.perf_counter()
        distill(model, self.teacher, self.task, fraction, seed)
        return _record(self.task, model, max(1, round(fraction * self.task.dense_steps)),
                       distill_seconds=time.perf_counter() - t0)

    def add(self, run: str, seeds: list[int], fn: Callable[[int], dict]) -> list[dict]:
        return self.cache.runs(self.task.name, run, seeds, fn, self.runs)

    def run_all(self) -> list[dict]:
        t, one, seeds = self.task, [0], self.seeds
        recs = self.add("dense", one, lambda s: _record(t, self.teacher, t.dense_steps))
        recs += self.add("weight", one, lambda s: self.zero_step("weight", s))
        recs += self.add("calib", seeds, lambda s: self.zero_step("calib", s))
        recs += self.add("budget weight", one, lambda s: self.zero_step("budget", s))
        recs += self.add("budget calib", seeds, lambda s: self.zero_step("budget calib", s))
        for f in FRACTIONS:
            pct = f"{f * 100:g}%"
            recs += self.add(f"weight+distill {pct}", seeds,
                             functools.partial(lambda f, s: self.distilled("weight", f, s), f))
            recs += self.add(f"calib+distill {pct}", seeds,
                             functools.partial(lambda f, s: self.distilled("calib", f, s), f))
            if f >= 0.05:
                recs += self.add(f"budget calib+distill {pct}", seeds,
                                 functools.partial(lambda f, s: self.distilled("budget calib", f, s), f))
        recs += self.add("scratch", seeds, lambda s: _record(t, common.scratch(t, s, n=2), t.dense_steps))
        recs += self.add("dense (training seed)", seeds, lambda s: _record(t, t.trained(s), t.dense_steps))
        return recs


def _compare(by_run: dict[str, list[dict]], a: str, b: str, welch: bool = False) -> dict | None:
    """a vs b over seeds: paired by seed (ttest_rel), Welch where the runs share nothing, or a one-sample
    t-test of a against b where b is deterministic (one value); no test where both are."""
    if a not in by_run or b not in by_run:
        return None
    va, vb = [r["metric"] for r in by_run[a]], [r["metric"] for r in by_run[b]]
    if len(va) == len(vb) == 1:
        out = {"test": "none (both deterministic)", "n": 1, "mean_diff": va[0] - vb[0], "p": None}
    elif len(vb) == 1:
        from scipy import stats

        p = stats.ttest_1samp(va, vb[0]).pvalue
        out = {"test": "ttest_1samp", "n": len(va), "mean_diff": statistics.fmean(va) - vb[0],
               "p": None if p != p else float(p)}
    elif welch:
        out = common.welch_test(va, vb)
    else:
        pairs = {r["seed"]: r["metric"] for r in by_run[b]}
        shared = [r for r in by_run[a] if r["seed"] in pairs]
        out = common.paired_test([r["metric"] for r in shared], [pairs[r["seed"]] for r in shared])
    return {"a": a, "b": b, **out}


COMPARISONS = [("calib", "weight", False)] + [
    (f"calib+distill {p}", f"weight+distill {p}", False) for p in ("1%", "5%", "20%")] + [
    ("weight+distill 20%", "scratch", True), ("calib+distill 20%", "scratch", True),
    ("budget calib", "calib", False), ("budget weight", "weight", False),
    ("budget calib+distill 5%", "calib+distill 5%", False), ("budget calib+distill 20%", "calib+distill 20%", False),
    ("scratch", "dense (training seed)", True)]


def summarise(records: list[dict]) -> dict[str, Any]:
    """Per task: per run mean ± std of the metric, ratio to the dense metric, params, seconds; comparisons."""
    tasks: dict[str, Any] = {}
    for name in dict.fromkeys(r["task"] for r in records):
        by_run: dict[str, list[dict]] = {}
        for r in records:
            if r["task"] == name:
                by_run.setdefault(r["run"], []).append(r)
        if "dense" not in by_run:
            continue
        dense = by_run["dense"][0]["metric"]
        rows = {}
        for run, recs in by_run.items():
            vals = [r["metric"] for r in recs]
            mean, std = common.mean_std(vals)
            rows[run] = {"metric_mean": mean, "metric_std": std, "ratio_mean": mean / dense,
                         "ratio_std": std / dense, "n": len(vals), "values": vals, "params": recs[0]["params"],
                         "steps": recs[0]["steps"], "seconds_total": sum(r["seconds"] for r in recs),
                         **{k: recs[0][k] for k in recs[0] if k.endswith(("_median", "_mean")) and "metric" not in k}}
        comps = [c for a, b, w in COMPARISONS if (c := _compare(by_run, a, b, w)) is not None]
        tasks[name] = {"dense_metric": dense, "runs": rows, "comparisons": comps}
    return tasks


def markdown(result: dict) -> str:
    lines = ["# Compressing trained networks (study)", "", f"machine: `{json.dumps(result['machine'])}`", ""]
    for name, t in result["tasks"].items():
        lines += [f"## {name} (dense test accuracy {t['dense_metric']:.4f}; {TASKS[name].note})", "",
                  "| run | params | steps | metric mean ± std | ratio to dense | n | out-err median "
                  "| wall s (all seeds) |",
                  "|---|---:|---:|---|---|---:|---:|---:|"]
        for run, r in t["runs"].items():
            lines.append(f"| {run} | {r['params']:,} | {r['steps']} | {r['metric_mean']:.4f} ± "
                         f"{r['metric_std']:.4f} | {r['ratio_mean']:.3f} ± {r['ratio_std']:.3f} | {r['n']} | "
                         f"{fmt(r.get('output_error_median'))} | {r['seconds_total']:.1f} |")
        lines += ["", "| a | b | test | n | mean(a − b) | p |", "|---|---|---|---|---:|---:|"]
        lines += [f"| {c['a']} | {c['b']} | {c['test']} | {c['n']} | {c['mean_diff']:+.4f} | {fmt(c['p'], 4)} |"
                  for c in t["comparisons"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__, "study", seeds=3).parse_args(argv)
    torch.set_num_threads(args.threads)
    cache, records = Cache(args.out / "runs", args.fresh), []
    started = time.perf_counter()
    for name in args.tasks.split(","):
        print(f"== {name}", flush=True)
        records += TaskStudy(TASKS[name], list(range(args.seeds)), cache, args.runs).run_all()
    result = {"machine": machine(threads=args.threads),
              "seeds": args.seeds, "fractions": FRACTIONS, "calibration_batches": common.CALIBRATION_BATCHES,
              "tasks": summarise(records), "records": records,
              "seconds_this_invocation": time.perf_counter() - started}
    write_results(args.out, "results", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
