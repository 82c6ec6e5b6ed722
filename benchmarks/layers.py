"""Layer benchmark: Kronecker layers vs their dense torch counterparts on U-Net-like shapes (CPU).

Run from the repo root: `python -m benchmarks.layers [--quick] [--cpu-time] [--processes K]`. Writes
benchmarks/results/layers.json and layers.md (wall clock, torch's default threads), or layers_cputime.{json,md} with
--cpu-time (one thread, timed by the thread's CPU time, which stays meaningful when other processes load the machine).
For every shape the two layers are timed alternately (ABBA order, interleaved repeats) in one process, so
machine-load drift hits both equally, and a process's ratio is the median over repeats of Kron / dense. The grid runs
in K fresh processes one after another (default 6; --quick: 1): a shape's ratio is the geometric mean of its
processes' ratios with a Student-t interval over processes (`benchmarks._common.replicate_ci`), since the C
allocator's heap, and with it the timing of a layer's big buffers, differs from process to process and not within
one. About 13 minutes on 2 cores with 6 processes.

Measured per shape:
- train step: forward + backward + Adam step (a converted nn.Conv2d / nn.Linear, its weight a KronParametrization,
  vs the dense layer), and the converted layer's step with kronify's CPU kernel switched off (torch ops build W);
- merged inference: the layer after `kronify.merge` vs the dense layer, eval mode under no_grad;
- weight build (forward + backward of W): `kron_weight` (the CPU kernel when built) vs a naive baseline written
  from the published formula W = Σ_i A_i ⊗ F_i (broadcast outer product of every term, then a sum over terms), and
  its two torch-op implementations on their own (the composite and the autograd.Function, which `kron_weight` takes
  without the kernel from 2¹⁹ weight entries on).
Targets (issue 19, no per-call hooks): median train-step ratio ≤ 1.03 over the shapes, none above 1.15 (judged
on the means; the summary also says whether every shape's interval is at or below 1.15);
merged inference 1.00 (≤ 1.02: what an A/A comparison reads on a shared machine). Issue 2 had 1.05 / 1.3.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks._common import (
    RESULTS, interleaved, load_average, machine, median_ms, ratio, ratio_ci, replicated, run_workers, write_results,
)
import kronify
from kronify import cpu_kernel, kron_weight
from kronify.kron import _kron_weight_composite, _KronWeight

CLOCK = time.perf_counter  # wall clock; --cpu-time switches to the calling thread's CPU time
SHAPE_BUDGET_S = 8.0  # rough time for one shape's interleaved train-step timings in one process (halved with more)
MIN_REPEATS = 7
TARGETS = {"median_train_ratio": 1.03, "max_train_ratio": 1.15, "merged_inference_ratio": 1.02}


def naive_kron_weight(A: Tensor, F: Tensor) -> Tensor:
    """Published formula, literally: broadcast every A_i ⊗ F_i to full size, then sum over i."""
    terms, n, _ = A.shape
    p, q, kernel = F.shape[1], F.shape[2], F.shape[3:]
    ones = (1,) * len(kernel)
    outer = A.view(terms, n, 1, n, 1, *ones) * F.view(terms, 1, p, 1, q, *kernel)  # (terms, n, p, n, q, *k)
    return outer.sum(0).reshape(n * p, n * q, *kernel)


def train_step_fn(layer: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(layer.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        layer(x).backward(grad)
        opt.step()

    return step


def without_cpu_kernel(step: Callable[[], None]) -> Callable[[], None]:
    """The step as it runs where kronify's CPU kernel cannot be built: torch ops build the weight."""

    def run() -> None:
        with cpu_kernel.disabled():
            step()

    return run


def inference_fn(layer: nn.Module, x: Tensor) -> Callable[[], None]:
    layer.eval()

    def infer() -> None:
        with torch.no_grad():
            layer(x)

    return infer


def build_fn(fn: Callable[[Tensor, Tensor], Tensor], A: Tensor, F: Tensor) -> Callable[[], None]:
    g = torch.randn(A.shape[1] * F.shape[1], A.shape[2] * F.shape[2], *F.shape[3:])

    def build() -> None:
        A.grad = F.grad = None
        fn(A, F).backward(g)

    return build


def bench_shape(kind: str, channels: int, size: int, batch: int, n: int, repeats: int,
                budget_s: float = SHAPE_BUDGET_S) -> dict:
    """One process's measurements of a shape: medians over interleaved repeats, and ratios of them."""
    torch.manual_seed(0)
    if kind == "conv2d":
        dense: nn.Module = nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(batch, channels, size, size)
    else:  # token-wise linear on the same feature map, (B, H·W, C)
        dense = nn.Linear(channels, channels)
        x = torch.randn(batch, size * size, channels)
    kron = copy.deepcopy(dense)
    kronify.convert(nn.Sequential(kron), n=n)
    factors = kron.parametrizations.weight
    A0, F0 = factors.original0, factors.original1.view(n, -1, factors.original1.shape[1], *factors.original1.shape[2:])
    grad = torch.randn_like(dense(x))

    steps = {"dense": train_step_fn(dense, x, grad), "kron": train_step_fn(kron, x, grad),
             "kron_torch_ops": without_cpu_kernel(train_step_fn(copy.deepcopy(kron), x, grad))}
    t0 = time.perf_counter()
    steps["dense"]()
    step_s = time.perf_counter() - t0
    # as many repeats as fit in budget_s, up to `repeats` (cheap shapes, whose ratios are the noisiest) and at
    # least MIN_REPEATS (expensive shapes), so the whole grid stays a few minutes
    reps = max(MIN_REPEATS, min(repeats, int(budget_s / (len(steps) * step_s))))
    train = interleaved(steps, reps, clock=CLOCK)
    infer = interleaved(
        {
            "dense": inference_fn(dense, x),
            "merged": inference_fn(kronify.merge(nn.Sequential(copy.deepcopy(kron)))[0], x),
            "kron_eval": inference_fn(kron, x),
        },
        reps,
        clock=CLOCK,
    )
    A = A0.detach().clone().requires_grad_()
    F = F0.detach().clone().requires_grad_()
    builds = {"kron_weight": build_fn(kron_weight, A, F), "naive": build_fn(naive_kron_weight, A, F),
              "composite": build_fn(_kron_weight_composite, A, F), "function": build_fn(_KronWeight.apply, A, F)}
    build = interleaved(builds, repeats, clock=CLOCK)
    return {
        "kind": kind,
        "channels": channels,
        "size": size,
        "batch": batch,
        "n": n,
        "terms": factors[0].terms,
        "repeats": reps,
        "params_dense": sum(p.numel() for p in dense.parameters()),
        "params_kron": sum(p.numel() for p in kron.parameters()),
        "train_ms": median_ms(train),
        "train_ratio": ratio(train, "kron", "dense"),
        "train_ratio_ci95": ratio_ci(train, "kron", "dense"),
        "train_ratio_torch_ops": ratio(train, "kron_torch_ops", "dense"),
        "train_min_ms": {k: min(v) * 1e3 for k, v in train.items()},
        "infer_ms": median_ms(infer),
        "merged_inference_ratio": ratio(infer, "merged", "dense"),
        "kron_eval_ratio": ratio(infer, "kron_eval", "dense"),
        "weight_build_ms": median_ms(build),
        "naive_over_kron_weight": ratio(build, "naive", "kron_weight"),
        "weight_build_share_of_train": statistics.median(build["kron_weight"]) / statistics.median(train["kron"]),
    }


def grid(quick: bool) -> list[tuple[int, int, int]]:
    """(channels, pixels, batch): the five levels of a U-Net (channels × 2 ⇔ pixels / 2), batch 1 and 8."""
    levels = [(32, 320), (64, 160), (128, 80), (256, 40), (512, 20)]
    if quick:
        return [(32, 160, 1), (128, 40, 2), (512, 20, 1)]
    return [(c, s, b) for b in (1, 8) for c, s in levels]


def run_grid(n: int, repeats: int, quick: bool, budget_s: float) -> list[dict]:
    """`bench_shape` over the grid, conv then linear, in this process."""
    rows = []
    for kind in ("conv2d", "linear"):
        for c, s, b in grid(quick):
            rows.append(bench_shape(kind, c, s, b, n, repeats, budget_s))
    return rows


# The ratios a shape reports, each the geometric mean over processes of one process's median.
PER_PROCESS = ["train_ratio", "train_ratio_torch_ops", "merged_inference_ratio", "kron_eval_ratio",
               "naive_over_kron_weight", "weight_build_share_of_train"]
MS = ["train_ms", "infer_ms", "weight_build_ms"]  # {layer or build: median ms} per process


def combine(rows: list[dict]) -> dict:
    """One shape's result over its processes: each ratio the geometric mean of the processes' medians, the train and
    merged-inference ratios with a t-interval over processes (`replicate_ci`; one process: the order-statistic
    interval of its repeats); the ratio of the fastest runs in any process; times the median of the processes'."""
    row = dict(rows[0], processes=len(rows))
    row.update(replicated(rows, PER_PROCESS, with_ci=("train_ratio", "merged_inference_ratio")))
    row.update({key: {k: statistics.median(r[key][k] for r in rows) for k in rows[0][key]} for key in MS})
    fastest = {k: min(r["train_min_ms"][k] for r in rows) for k in ("dense", "kron")}
    row["train_ratio_of_minima"] = fastest["kron"] / fastest["dense"]
    return row


def summarize(rows: list[dict]) -> dict:
    """Targets over the shapes, judged on each shape's mean ratio; `max_train_ratio_shown` says whether every shape's
    interval lies at or below the worst-shape target (True), some shape's lies wholly above it (False), or neither
    (None)."""
    train = [r["train_ratio"] for r in rows]
    merged = [r["merged_inference_ratio"] for r in rows]
    worst = max(rows, key=lambda r: r["train_ratio"])
    highs = [r["train_ratio_ci95"][1] for r in rows]
    lows = [r["train_ratio_ci95"][0] for r in rows]
    limit = TARGETS["max_train_ratio"]
    out = {
        "median_train_ratio": statistics.median(train),
        "max_train_ratio": max(train),
        "max_train_ratio_ci95": worst["train_ratio_ci95"],
        "max_train_ratio_shape": f"{worst['kind']} C={worst['channels']} B={worst['batch']}",
        "max_train_ratio_shown": True if max(highs) <= limit else (False if max(lows) > limit else None),
        "merged_inference_ratio": statistics.median(merged),
        "max_merged_inference_ratio": max(merged),
        "median_kron_eval_ratio": statistics.median(r["kron_eval_ratio"] for r in rows),
        "median_naive_over_kron_weight": statistics.median(r["naive_over_kron_weight"] for r in rows),
        "median_train_ratio_of_minima": statistics.median(r["train_ratio_of_minima"] for r in rows),
        "median_train_ratio_torch_ops": statistics.median(r["train_ratio_torch_ops"] for r in rows),
        "max_train_ratio_torch_ops": max(r["train_ratio_torch_ops"] for r in rows),
    }
    for kind in sorted({r["kind"] for r in rows}):
        sub = [r["train_ratio"] for r in rows if r["kind"] == kind]
        out[f"median_train_ratio_{kind}"] = statistics.median(sub)
        out[f"max_train_ratio_{kind}"] = max(sub)
    out["targets"] = {k: {"target": v, "measured": out[k], "met": out[k] <= v} for k, v in TARGETS.items()}
    return out


def oversubscription_note(result: dict) -> list[str]:
    """A warning line when other processes were competing for the CPUs during a wall-clock run."""
    m = result["machine"]
    loads = [v[0] for v in (m["load_average_at_start"], m.get("load_average_at_end")) if v]
    if result["clock"] != "wall clock" or not loads or max(loads) <= (m["logical_cpus"] or 1):
        return []
    return [
        "",
        f"**Warning: the machine was oversubscribed (1-min load up to {max(loads):.1f} on {m['logical_cpus']} CPUs).** "
        "Every multi-threaded op then risks waiting for a descheduled worker thread, which penalizes the layer "
        "with more (small) ops; these wall-clock ratios then mostly measure the contention. "
        "See `python -m benchmarks.layers --cpu-time` (layers_cputime.md) or rerun on an idle machine.",
    ]


def fmt_load(load) -> str:
    return "n/a" if load is None else "/".join(f"{v:.2f}" for v in load)


def fmt_value(v) -> str:
    """A summary value for the table: ratios to 3 decimals, intervals as [lo–hi], flags as yes / NO / undecided."""
    if isinstance(v, (list, tuple)):
        return f"[{v[0]:.3f}–{v[1]:.3f}]"
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, bool):
        return {None: "undecided", True: "yes", False: "NO"}[v]
    return f"{v:.3f}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["summary"]
    processes = result.get("processes", 1)
    lines = [
        "# Layer benchmark (CPU)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, torch threads: "
        f"{m['torch_threads']} (OpenMP wait policy {m.get('omp_wait_policy', 'default')}), Python {m['python']}; "
        f"load average at start {fmt_load(m['load_average_at_start'])}, "
        f"at end {fmt_load(m.get('load_average_at_end'))} (other processes share the CPUs when it exceeds the "
        "threads).",
        f"Clock: {result['clock']}. Settings: n={result['n']}, terms=n, {processes} fresh process(es) one after "
        f"another, each timing every shape with {MIN_REPEATS}–{result['repeats']} interleaved repeats "
        f"(column 'reps', the first process's; weight builds always {result['repeats']}), "
        "Adam, conv 3×3 C→C padding 1, linear C→C on (B, H·W, C) tokens. In each process a ratio is the median over "
        "repeats of Kron/dense timed back to back; the table gives the geometric mean over processes with a 95% "
        "Student-t interval over them (one process: order statistics of its repeats), since steps in one process "
        "share the C allocator's heap and processes do not. 'min ratio' = fastest Kron / fastest dense in any "
        "process. Times (ms) are the median over processes of each process's median. kronify's CPU kernel "
        f"(`kronify.cpu_kernel`) was {'built' if result.get('cpu_kernel') else 'NOT built'}: 'train ratio, torch ops' "
        "is the Kron layer's step with it switched off (as without a C++ compiler), timed in the same interleaving; "
        "'W build ms' is `kron_weight` forward + backward (the kernel when built).",
        *oversubscription_note(result),
        "",
        "| layer | C | px | B | reps | params kron/dense | train ms dense | train ms kron | train ratio [95% CI] "
        "| min ratio | train ratio, torch ops | merged infer ratio [95% CI] | kron eval ratio | W build ms "
        "| composite / Function W build ms | naive W build ms | W build / train |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        (lo, hi), (mlo, mhi), b = r["train_ratio_ci95"], r["merged_inference_ratio_ci95"], r["weight_build_ms"]
        lines.append(
            f"| {r['kind']} | {r['channels']} | {r['size']} | {r['batch']} | {r['repeats']} "
            f"| {r['params_kron']}/{r['params_dense']} | {r['train_ms']['dense']:.2f} | {r['train_ms']['kron']:.2f} "
            f"| {r['train_ratio']:.3f} [{lo:.3f}–{hi:.3f}] | {r['train_ratio_of_minima']:.3f} "
            f"| {r['train_ratio_torch_ops']:.3f} "
            f"| {r['merged_inference_ratio']:.3f} [{mlo:.3f}–{mhi:.3f}] | {r['kron_eval_ratio']:.3f} "
            f"| {b['kron_weight']:.3f} | {b['composite']:.3f} / {b['function']:.3f} | {b['naive']:.3f} "
            f"| {r['weight_build_share_of_train']:.1%} |"
        )
    lines += ["", "## Summary", "", "| metric | target | measured | met |", "|---|---|---|---|"]
    for k, t in s["targets"].items():
        lines.append(f"| {k} | ≤ {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else 'NO'} |")
    for k in sorted(s):
        if k != "targets" and k not in s["targets"]:
            lines.append(f"| {k} | | {fmt_value(s[k])} | |")
    if processes > 1:
        lines += ["", "Train ratio of each process, in the order they ran:", ""]
        lines += [f"- {r['kind']} C={r['channels']} B={r['batch']}: "
                  + ", ".join(f"{v:.3f}" for v in r["train_ratio_per_process"]) for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three shapes, few repeats, one process (~30 s)")
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--processes", type=int, default=None,
                        help="fresh Python processes, one after another, each timing every shape (default 6; "
                             "--quick: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="1 thread, timed by thread CPU time (robust when other processes load the machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None,
                        help="result file names STEM.json and .md (default: layers, or layers_cputime with --cpu-time)")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)  # time the grid here, write its rows there
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        # With one torch thread all work (forward, autograd backward, optimizer) runs on this thread, so its
        # CPU time excludes the time other processes hold the CPU: a load-independent measure of work.
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    elif args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (7 if args.quick else 101)
    processes = args.processes or (1 if args.quick else 6)
    if args.worker_out:
        rows = run_grid(args.n, repeats, args.quick, args.budget or SHAPE_BUDGET_S)
        Path(args.worker_out).write_text(json.dumps(rows))
        return None
    info = machine()
    kernel = cpu_kernel.ops() is not None  # built here once, so that the workers load it from torch's cache
    t0 = time.perf_counter()
    if processes == 1:
        runs = [run_grid(args.n, repeats, args.quick, SHAPE_BUDGET_S)]
    else:  # each process half the time per shape: the processes are the replicates
        worker = [*(argv if argv is not None else sys.argv[1:]), "--budget", str(SHAPE_BUDGET_S / 2)]
        runs = run_workers("benchmarks.layers", worker, processes)
    rows = [combine(list(shape_rows)) for shape_rows in zip(*runs)]
    for row in rows:
        lo, hi = row["train_ratio_ci95"]
        print(f"{row['kind']:6s} C={row['channels']:3d} px={row['size']:3d} B={row['batch']}: train "
              f"{row['train_ratio']:.3f} [{lo:.3f}-{hi:.3f}]  merged {row['merged_inference_ratio']:.3f}  "
              f"kron-eval {row['kron_eval_ratio']:.3f}", flush=True)
    info["load_average_at_end"] = load_average()
    result = {"machine": info, "clock": "thread CPU time, 1 thread" if args.cpu_time else "wall clock", "n": args.n,
              "repeats": repeats, "processes": processes, "quick": args.quick, "cpu_kernel": kernel, "rows": rows,
              "summary": summarize(rows), "seconds": time.perf_counter() - t0}
    write_results(args.out, args.stem or ("layers_cputime" if args.cpu_time else "layers"), result, markdown(result))
    return result


if __name__ == "__main__":
    main()
