"""Design-choice measurements on each task's trained dense model (seed 0):

(a) calibration method weight / kron / als, sequential vs parallel: held-out relative output error per layer
    (median and mean over converted layers) and the task metric at 0 steps (calibration batches of seed 0);
(b) the `budget` rule vs uniform n=2 at the same total parameter count (budget = uniform n=2's share), at 0
    steps and after distilling for 5 % of the dense steps;
(c) distillation settings after 5 % of the dense steps from the weight-only and from the calibrated n=2 start:
    lr, loss (MSE vs KL at temperature 1 and 2), freeze_norm_stats, feature matching (Task.features).

    python -m benchmarks.compress.choices [--tasks ...] [--seeds 2] [--out out/compress/choices]
        [--runs REGEX] [--fresh]
"""

from __future__ import annotations

import copy
import functools
import json
import time
from typing import Any

import torch
from torch import nn

import kronify
from benchmarks._common import machine, write_results
from benchmarks.compress import common
from benchmarks.compress.common import Cache, compress, distill, fmt, layer_errors, n_params
from benchmarks.compress.tasks import TASKS, Task

FRACTION = 0.05
DISTILL_VARIANTS: dict[str, dict[str, Any]] = {
    "lr 1e-4": {"lr": 1e-4}, "lr 3e-4": {"lr": 3e-4}, "lr 1e-3 (default, mse)": {}, "lr 3e-3": {"lr": 3e-3},
    "kl T=1": {"loss": "kl", "temperature": 1.0}, "kl T=2": {"loss": "kl", "temperature": 2.0},
    "freeze_norm_stats=False": {"freeze_norm_stats": False}, "features": {"features": "task"},
}


class TaskChoices:
    """The three groups of measurements for one task, each run cached per (run, seed)."""

    def __init__(self, task: Task, seeds: list[int], cache: Cache, runs: str = "") -> None:
        self.task, self.seeds, self.cache, self.runs = task, seeds, cache, runs
        self.teacher = task.trained(0)

    def _run(self, group: str, run: str, seeds: list[int], fn: Any) -> list[dict]:
        recs = self.cache.runs(self.task.name, f"{group}/{run}", seeds, fn, self.runs)
        return [{**r, "group": group, "name": run} for r in recs]

    def calibration(self) -> list[dict]:
        """(a): every method, sequential and parallel (weight: once, it reads no inputs)."""
        def fit(method: str, sequential: bool, seed: int) -> dict:
            cfg = kronify.CalibrationConfig(method=method, sequential=sequential)
            t0 = time.perf_counter()
            model, report = compress(self.teacher, self.task, seed=seed, calibrate=True, calibration_config=cfg, n=2)
            return {"metric": self.task.metric(model), "params": n_params(model), "steps": 0,
                    "convert_seconds": time.perf_counter() - t0, **layer_errors(report),
                    "fits": sorted({str(getattr(r, "fit", "")) for r in report.rows if r.status == "converted"})}

        recs = self._run("calibration", "weight-only (no calibration)", [0],
                         lambda s: self._zero(compress(self.teacher, self.task, n=2)))
        for method in ("weight", "kron", "als"):
            for sequential in ((True,) if method == "weight" else (True, False)):
                run = f"{method} {'sequential' if sequential else 'parallel'}"
                recs += self._run("calibration", run, [0], functools.partial(fit, method, sequential))
        return recs

    def _zero(self, compressed: tuple[nn.Module, Any]) -> dict:
        model, report = compressed
        return {"metric": self.task.metric(model), "params": n_params(model), "steps": 0, **layer_errors(report)}

    def budget(self) -> list[dict]:
        """(b): budget = uniform n=2's share of parameters vs uniform n=2, at 0 steps and after 5 %."""
        uniform, _ = compress(self.teacher, self.task, n=2)
        share = n_params(uniform) / n_params(self.teacher)
        sizes = {"uniform n=2": {"n": 2}, f"budget={share:.3f}": {"budget": share}}
        recs = []
        for name, size in sizes.items():
            start = functools.partial(compress, self.teacher, self.task, calibrate=True, **size)
            recs += self._run("budget", f"{name} 0 steps", [0], lambda s, st=start: self._zero(st(seed=s)))
            recs += self._run("budget", f"{name} distill 5%", self.seeds,
                              lambda s, st=start: self._distilled(st(seed=s)[0], s, {}))
        return recs

    def _distilled(self, student: nn.Module, seed: int, kw: dict[str, Any]) -> dict:
        t0 = time.perf_counter()
        distill(student, self.teacher, self.task, FRACTION, seed, **kw)
        return {"metric": self.task.metric(student), "params": n_params(student),
                "steps": max(1, round(FRACTION * self.task.dense_steps)), "distill_seconds": time.perf_counter() - t0}

    def distillation(self) -> list[dict]:
        """(c): each variant from the same warm start per seed: weight-only and calibrated."""
        starts: dict[tuple[bool, int], nn.Module] = {}

        def run(calibrate: bool, kw: dict[str, Any], seed: int) -> dict:
            if (calibrate, seed) not in starts:
                starts[calibrate, seed] = compress(self.teacher, self.task, seed=seed, calibrate=calibrate, n=2)[0]
            kw = {**kw, "features": list(self.task.features)} if kw.get("features") == "task" else kw
            return self._distilled(copy.deepcopy(starts[calibrate, seed]), seed, kw)

        return [r for calibrate in (False, True) for name, kw in DISTILL_VARIANTS.items()
                for r in self._run("distill", f"{'calib' if calibrate else 'weight'}: {name}", self.seeds,
                                   functools.partial(run, calibrate, kw))]


def summarise(records: list[dict]) -> dict[str, Any]:
    """Per task and group: per run mean ± std of the metric and the mean of the other numeric fields."""
    out: dict[str, Any] = {}
    for r in records:
        run = out.setdefault(r["task"], {}).setdefault(r["group"], {}).setdefault(r["name"], {"values": []})
        run["values"].append(r["metric"])
        for k, v in r.items():
            if k not in ("metric", "seed") and isinstance(v, (int, float)) and not isinstance(v, bool):
                run.setdefault(k, []).append(v)
    for groups in out.values():
        for runs in groups.values():
            for run in runs.values():
                run["metric_mean"], run["metric_std"] = common.mean_std(run["values"])
                for k in [k for k in run if isinstance(run[k], list) and k != "values"]:
                    run[k] = sum(run[k]) / len(run[k])
    return out


def markdown(result: dict) -> str:
    lines = ["# Compressing trained networks: design choices", "", f"machine: `{json.dumps(result['machine'])}`", ""]
    for task, groups in result["summary"].items():
        dense = result["dense_metric"][task]
        lines += [f"## {task} (dense test accuracy {dense:.4f})", "",
                  "| group | run | params | steps | metric mean ± std | ratio to dense | n | out-err median / mean "
                  "| weight-fit err median | s per run |", "|---|---|---:|---:|---|---:|---:|---|---:|---:|"]
        for group, runs in groups.items():
            for name, r in runs.items():
                secs = r.get("convert_seconds", r.get("distill_seconds", r["seconds"]))
                lines.append(
                    f"| {group} | {name} | {int(r['params']):,} | {int(r['steps'])} | {r['metric_mean']:.4f} ± "
                    f"{r['metric_std']:.4f} | {r['metric_mean'] / dense:.3f} | {len(r['values'])} | "
                    f"{fmt(r.get('output_error_median'))} / {fmt(r.get('output_error_mean'))} | "
                    f"{fmt(r.get('weight_fit_error_median'))} | {secs:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = common.parser(__doc__, "choices", seeds=2, runs_on="group/run")
    ap.add_argument("--groups", default="calibration,budget,distillation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache, records, dense = Cache(args.out / "runs", args.fresh), [], {}
    for name in args.tasks.split(","):
        print(f"== {name}", flush=True)
        tc = TaskChoices(TASKS[name], list(range(args.seeds)), cache, args.runs)
        dense[name] = TASKS[name].metric(tc.teacher)
        for group in args.groups.split(","):
            records += getattr(tc, group)()
    result = {"machine": machine(threads=args.threads),
              "seeds": args.seeds, "fraction": FRACTION, "calibration_batches": common.CALIBRATION_BATCHES,
              "dense_metric": dense, "summary": summarise(records), "records": records}
    write_results(args.out, "results", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
