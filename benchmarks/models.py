"""Model benchmark: zoo U-Net and SwinMR presets vs their Kronecker versions (`zoo.create_kron`, n = 2).

Run from the repo root: `python -m benchmarks.models [--quick]`. Writes benchmarks/results/models.json and
models.md. Each case (preset, image size, batch) runs in several fresh Python processes, one after another
(`--processes`, default 6): in each, dense and Kronecker models are timed alternately (ABBA order, interleaved
repeats) and a ratio is the median over repeats of Kron / dense. A case's ratio is the geometric mean of its
processes' ratios, with a Student-t interval over processes (the C allocator's state, and with it a run's page
faults, differs from process to process and not within one; `benchmarks._common.replicate_ci`); as a load-robust
second figure, the ratio of the fastest runs.

Measured:
- train step: zero_grad + forward + MSE backward + Adam step (wall clock; also process CPU time and
  minor page faults per step);
- merged inference: `kronify.merge(kron model)` vs the dense model, eval mode under no_grad (the merged
  model is checked to have the dense model's layer classes and tensor layouts);
- an A/A control: an exact copy of the dense model, timed alongside in both, whose ratio to the dense
  model is the machine's noise alone;
- parameter + gradient + Adam-state bytes, for every U-Net and SwinMR preset (they need no timing):
  4 × the bytes of the trainable parameters (param, grad, exp_avg, exp_avg_sq) — for the Kronecker
  model the factors A, F, the biases and whatever is outside Kron layers;
- peak memory of one training step (after a warm-up step, so Adam state exists). On CPU, tracemalloc
  does not see torch's allocator, so this uses torch.profiler's memory timeline
  (profile_memory + record_shapes + with_stack, `export_memory_timeline(device="cpu")`): the peak over
  the step of all live tensors by category (parameters, optimizer state, inputs, activations,
  gradients, temporaries). On CUDA it is `torch.cuda.max_memory_allocated` over the step.
Targets (issue 19): train step ≤ 1.05 (U-Net and SwinMR; issue 4 allowed SwinMR 1.10); merged inference
≤ 1.02; parameter + optimizer bytes ≤ 0.52 of dense; peak training memory not above dense.

CPU cases take about 30 minutes on 2 cores (six processes each): the fastMRI U-Net (chans 32) at 320×320, the
demo SwinMR (embed 24) at 320×320, and the paper's SwinMR (embed 120, 36 Swin layers) at 64×64 only:
one of its training steps takes seconds at 64×64 and minutes at 320×320 on 2 cores. The weight rebuild
costs the same at any image size while the rest of a step grows with the pixels, so its ratio at 64×64
is an upper bound for 320×320. With a GPU, the full-size presets at 320×320 run too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import kronify
from kronify.parametrization import kron_parametrizations
import zoo
from benchmarks._common import (
    RESULTS, best_ratio, interleaved, load_average, machine, median_ms, ratio, ratio_ci, replicated,
    run_workers, write_results,
)

TARGETS = {"train_ratio": {"unet": 1.05, "swinmr": 1.05}, "merged_inference_ratio": 1.02,
           "param_optimizer_ratio": 0.52, "peak_ratio": 1.0}

# (preset, image size, batch, family)
CPU_CASES = [("unet", 320, 1, "unet"), ("swinmr_demo", 320, 1, "swinmr"), ("swinmr_paper", 64, 1, "swinmr")]
QUICK_CASES = [("unet_demo", 320, 1, "unet"), ("swinmr_demo", 320, 1, "swinmr")]
STATE_PRESETS = ["unet", "unet_demo", "swinmr", "swinmr_paper", "swinmr_demo"]
QUICK_STATE = ["unet_demo", "swinmr_demo"]
WARMUP = 2  # untimed calls of each step before the interleaved repeats
GPU_CASES = [("unet", 320, 8, "unet"), ("swinmr_paper", 320, 1, "swinmr"), ("swinmr", 320, 1, "swinmr")]


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """A closure running one Adam training step of `model` on (x, target)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
        sync(x.device)

    return step


def inference(model: nn.Module, x: torch.Tensor):
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)
        sync(x.device)

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def metered(fn, log: list):
    """`fn`, appending (process CPU seconds, minor page faults) of each call to `log`.

    CPU time (all threads, user + system) is not inflated by other processes the way wall time is;
    page faults show how much of a step is the C allocator handing fresh pages to torch (glibc returns
    freed memory to the OS and faults it back in on the next step, more or less as the allocation
    pattern happens to fall)."""
    def run() -> None:
        c0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        log.append((time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))

    return run


def layout(model: nn.Module) -> list:
    """Module classes and each tensor's name, shape, strides and dtype: equal layouts run the same kernels."""
    return ([(k, type(m)) for k, m in model.named_modules()]
            + [(k, v.shape, v.stride(), v.dtype) for k, v in model.state_dict().items()])


def state_bytes(model: nn.Module) -> int:
    """Parameter + gradient + Adam (exp_avg, exp_avg_sq) bytes of the trainable parameters."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def peak_step_bytes(step, device: torch.device) -> int:
    """Peak bytes of live tensors during one call of `step` (see the module docstring for the method)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        with warnings.catch_warnings():  # deprecated in favour of a CUDA-only API; still the CPU method
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    return max(sum(row) for row in sizes) if sizes else 0


def bench_case(name: str, size: int, batch: int, family: str, device: torch.device, repeats: int,
               peak: bool = True) -> dict:
    """One process's measurements of a case: medians and ratios over its interleaved repeats, and the raw times."""
    start = time.perf_counter()
    torch.manual_seed(0)
    dense = zoo.create(name).to(device)
    kron, report = zoo.create_kron(name)
    kron = kron.to(device)
    merged = kronify.merge(copy.deepcopy(kron)).to(device)
    if layout(merged) != layout(dense):
        raise RuntimeError(f"merged {name} does not have the dense model's layer classes and tensor layouts")
    x = torch.randn(batch, 2, size, size, device=device)
    target = torch.randn_like(x)

    # "control" is an exact copy of the dense model: its ratio to dense (an A/A comparison) is what the
    # machine's noise alone makes of two identical models, the yardstick for the Kron and merged ratios.
    control = copy.deepcopy(dense)
    steps = {"dense": train_step(dense, x, target), "control": train_step(control, x, target),
             "kron": train_step(kron, x, target)}
    meters = {k: [] for k in steps}
    train = interleaved({k: metered(steps[k], meters[k]) for k in steps}, repeats, warmup=WARMUP)
    cpu = {k: [c for c, _ in v[WARMUP:]] for k, v in meters.items()}
    faults = {k: statistics.median(f for _, f in v[WARMUP:]) for k, v in meters.items()}
    infer = interleaved({"dense": inference(dense, x), "control": inference(control, x),
                         "merged": inference(merged, x)}, 2 * repeats)
    dense.train()
    peaks = {k: peak_step_bytes(steps[k], device) for k in ("dense", "kron")} if peak else None
    return {
        "model": name, "family": family, "size": size, "batch": batch, "device": device.type,
        "params": {"dense": report.params_before, "kron": report.params_after},
        "train_step_ms": median_ms(train),
        "train_ratio": ratio(train, "kron", "dense"),
        "train_ratio_ci95": ratio_ci(train, "kron", "dense"),
        "train_ratio_control": ratio(train, "control", "dense"),
        "train_cpu_ratio": ratio(cpu, "kron", "dense"),
        "train_cpu_ratio_control": ratio(cpu, "control", "dense"),
        "train_page_faults": faults,
        "inference_ms": median_ms(infer),
        "merged_inference_ratio": ratio(infer, "merged", "dense"),
        "merged_inference_ratio_ci95": ratio_ci(infer, "merged", "dense"),
        "inference_ratio_control": ratio(infer, "control", "dense"),
        "peak_step_bytes": peaks,
        "times": {"train": train, "infer": infer},
        "seconds": time.perf_counter() - start,
    }


def in_processes(case: tuple, device: torch.device, repeats: int, processes: int) -> list[dict]:
    """`bench_case` rows from `processes` fresh Python processes, one after another (peak memory in the first)."""
    args = ["--worker", json.dumps([*case, device.type]), "--repeats", str(repeats)]
    return run_workers("benchmarks.models", args, processes, later_args=["--no-peak"])


# The ratios a case reports, each the geometric mean over processes of one process's median.
PER_PROCESS = ["train_ratio", "train_ratio_control", "train_cpu_ratio", "train_cpu_ratio_control",
               "merged_inference_ratio", "inference_ratio_control"]


def combine(rows: list[dict]) -> dict:
    """One case's result over its processes: each ratio the geometric mean of the processes' medians, with a t-interval
    over processes for the train and merged-inference ratios (`replicate_ci`; one process: its order-statistic
    interval of the train ratio); best ratios from the fastest run of each model in any process."""
    row = {k: rows[0][k] for k in ("model", "family", "size", "batch", "device", "params", "peak_step_bytes")}
    row["processes"] = len(rows)
    row.update(replicated(rows, PER_PROCESS, with_ci=("train_ratio", "merged_inference_ratio")))
    pooled = {k: {m: [t for r in rows for t in r["times"][k][m]] for m in rows[0]["times"][k]}
              for k in ("train", "infer")}
    row["train_ratio_best"] = best_ratio(pooled["train"], "kron", "dense")
    row["merged_inference_ratio_best"] = best_ratio(pooled["infer"], "merged", "dense")
    row["train_step_ms"], row["inference_ms"] = median_ms(pooled["train"]), median_ms(pooled["infer"])
    row["train_page_faults"] = {m: statistics.median(r["train_page_faults"][m] for r in rows)
                                for m in rows[0]["train_page_faults"]}
    pk = row["peak_step_bytes"]
    row["peak_ratio"] = pk["kron"] / pk["dense"] if pk and pk["dense"] else float("nan")
    row["seconds"] = sum(r["seconds"] for r in rows)
    target = TARGETS["train_ratio"][row["family"]]
    row["meets"] = {
        "train": row["train_ratio"] <= target,
        "train_shown": row["train_ratio_ci95"][1] <= target,
        "merged_inference": row["merged_inference_ratio"] <= TARGETS["merged_inference_ratio"],
        "peak": row["peak_ratio"] <= TARGETS["peak_ratio"],
    }
    return row


def state_case(name: str) -> dict:
    """Parameter + gradient + Adam-state bytes of preset `name`, dense and Kronecker (no timing: these do
    not depend on the input), and the share of the dense model's parameters that no Kron layer holds
    (norms, position-bias tables, ...), which bounds the ratio from below whatever n is."""
    torch.manual_seed(0)
    dense = zoo.create(name)
    kron, _ = zoo.create_kron(name)
    in_kron = {id(t) for _, owner, _, _ in kron_parametrizations(kron) for t in owner.parameters(recurse=False)}
    in_kron |= {id(t) for _, owner, _, _ in kron_parametrizations(kron)
                for t in owner.parametrizations.parameters()}
    outside = sum(p.numel() for p in kron.parameters() if id(p) not in in_kron)
    bytes_ = {"dense": state_bytes(dense), "kron": state_bytes(kron)}
    share = outside / sum(p.numel() for p in dense.parameters())
    n = zoo.kron_settings(name)["n"]
    row = {"model": name, "n": n, "param_optimizer_bytes": bytes_,
           "param_optimizer_ratio": bytes_["kron"] / bytes_["dense"], "outside_kron_share": share,
           "floor": share + (1 - share) / n}
    row["meets"] = row["param_optimizer_ratio"] <= TARGETS["param_optimizer_ratio"]
    # A preset whose floor is above the target cannot meet it by any Kronecker conversion at this n.
    row["reachable"] = row["floor"] <= TARGETS["param_optimizer_ratio"]
    return row


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Model benchmark: dense vs Kronecker (n = 2)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['torch_threads']} threads, "
        f"OpenMP wait policy {m.get('omp_wait_policy', 'default')})"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; malloc settings {m.get('malloc')}"
        + f"; load average at start {m.get('load_average_at_start')}, at end {m.get('load_average_at_end')}.",
        f"Repeats: {result['processes']} fresh processes per case, each {result['repeats']} train steps and "
        f"{2 * result['repeats']} inferences (interleaved, ABBA); quick: {result['quick']}; total "
        f"{result['seconds']:.0f} s.",
        "",
        "| model | device | size×batch | params dense → kron | train step ms dense / kron | "
        "train ratio (best) [95% CI] | train A/A | train CPU-time ratio (A/A) | page faults per step dense / kron | "
        "merged infer ratio (best) [95% CI] | "
        "infer A/A | peak step MB dense / kron (ratio) | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mb = lambda b: b / 2**20  # noqa: E731
    for r in result["rows"]:
        pk, pf, (lo, hi), (mlo, mhi) = (r["peak_step_bytes"], r["train_page_faults"], r["train_ratio_ci95"],
                                        r["merged_inference_ratio_ci95"])
        met = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["meets"].items())
        lines.append(
            f"| {r['model']} | {r['device']} | {r['size']}²×{r['batch']} | {r['params']['dense']:,} → "
            f"{r['params']['kron']:,} | {r['train_step_ms']['dense']:.1f} / {r['train_step_ms']['kron']:.1f} | "
            f"{r['train_ratio']:.3f} ({r['train_ratio_best']:.3f}) [{lo:.3f}–{hi:.3f}] | "
            f"{r['train_ratio_control']:.3f} | "
            f"{r['train_cpu_ratio']:.3f} ({r['train_cpu_ratio_control']:.3f}) | "
            f"{pf['dense']:,.0f} / {pf['kron']:,.0f} | {r['merged_inference_ratio']:.3f} "
            f"({r['merged_inference_ratio_best']:.3f}) [{mlo:.3f}–{mhi:.3f}] | {r['inference_ratio_control']:.3f} | "
            f"{mb(pk['dense']):.1f} / {mb(pk['kron']):.1f} "
            f"({r['peak_ratio']:.3f}) | {met} |")
    lines += ["", "Train ratio (Kron / dense median) of each process, in the order they ran:", ""]
    lines += [f"- {r['model']} ({r['device']}): " + ", ".join(f"{v:.3f}" for v in r["train_ratio_per_process"])
              for r in result["rows"]]
    lines += [
        "",
        "Parameter + gradient + Adam-state bytes (they do not depend on the input, so every preset is listed):",
        "",
        "| model | dense MB | kron MB | ratio | parameters outside Kron layers | floor s + (1 − s)/n | ≤ target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["state_rows"]:
        pb = r["param_optimizer_bytes"]
        verdict = "yes" if r["meets"] else ("NO" if r["reachable"] else "unreachable: floor above target")
        lines.append(f"| {r['model']} | {mb(pb['dense']):.2f} | {mb(pb['kron']):.2f} | {r['param_optimizer_ratio']:.3f} "
                     f"| {100 * r['outside_kron_share']:.1f}% | {r['floor']:.3f} | {verdict} |")
    lines += [
        "",
        f"Targets: train ratio ≤ {TARGETS['train_ratio']['unet']} (U-Net), ≤ {TARGETS['train_ratio']['swinmr']} "
        f"(SwinMR); merged inference ≤ {TARGETS['merged_inference_ratio']}; param+optimizer bytes ≤ "
        f"{TARGETS['param_optimizer_ratio']} of dense; peak training memory ≤ dense.",
        "Ratios: in each process, the median over interleaved repeats of Kron / dense wall time of the same repeat; "
        "the table gives their geometric mean over the processes, and in parentheses the ratio of the fastest runs "
        "in any process, which other processes' load inflates least. A fresh process lands the C allocator's heap "
        "somewhere new, and steps within a process share it, so the processes are the independent replicates: the "
        "95% confidence interval is Student's t over the processes' log ratios (one process: order statistics of "
        "its repeats). Targets are judged on the mean wall-clock ratio ('train'); 'train_shown' says whether the "
        "whole interval is at or below the target. The CPU-time ratio (process user + system time, all threads) is "
        "the same median for CPU time, which other processes' load does not inflate; page faults are the median "
        "minor faults of a step (the C allocator faulting freed memory back in; its malloc settings are in the "
        "machine line).",
        "A/A: the same median ratio for an exact copy of the dense model timed alongside (control / dense): how "
        "far from 1.000 the machine's noise alone puts two identical models, the yardstick for the other ratios. "
        "A merged model has the dense model's layer classes and weight layouts, so its ratio is an A/A comparison too.",
        "Parameters outside Kron layers (norms, relative-position-bias tables) stay dense at any n, so a model "
        "whose share of them is s cannot go below s + (1 − s)/n; where that floor is above the target (the tiny "
        "demo SwinMR, 6% of it norms and bias tables) no conversion at that n can meet it.",
        "Peak memory on CPU: torch.profiler memory timeline (all live tensors by category) over one training "
        "step after a warm-up step; on CUDA: torch.cuda.max_memory_allocated.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small presets, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--stem", default="models",
                        help="result file names (benchmarks/results/STEM.json and .md); e.g. a run under other "
                             "malloc settings (see the Makefile's bench target) keeps its own files")
    parser.add_argument("--processes", type=int, default=None,
                        help="fresh Python processes per case, one after another (default 6; --quick: 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a case as JSON: run it here, write its row
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--no-peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 12)
    if args.worker:
        *case, device = json.loads(args.worker)
        row = bench_case(*case, torch.device(device), repeats, peak=not args.no_peak)
        Path(args.worker_out).write_text(json.dumps(row))
        return 0
    processes = args.processes or (1 if args.quick else 6)
    cases = [(c, torch.device("cpu")) for c in (QUICK_CASES if args.quick else CPU_CASES)]
    info = machine()
    info["malloc"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"} or "default"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        cases += [(c, torch.device("cuda")) for c in (QUICK_CASES if args.quick else GPU_CASES)]
    t0 = time.perf_counter()
    rows = []
    for (name, size, batch, family), device in cases:
        print(f"{name} {size}x{size} batch {batch} on {device.type} ...", flush=True)
        rows.append(combine(in_processes((name, size, batch, family), device, repeats, processes)))
        r = rows[-1]
        lo, hi = r["train_ratio_ci95"]
        print(f"  train ratio {r['train_ratio']:.3f} [{lo:.3f}-{hi:.3f}] (CPU time {r['train_cpu_ratio']:.3f}), "
              f"merged inference {r['merged_inference_ratio']:.3f}, peak {r['peak_ratio']:.3f}", flush=True)
    state_rows = [state_case(name) for name in (QUICK_STATE if args.quick else STATE_PRESETS)]
    info["load_average_at_end"] = load_average()
    result = {"machine": info, "repeats": repeats, "processes": processes, "quick": args.quick,
              "seconds": time.perf_counter() - t0,
              "rows": rows, "state_rows": state_rows}
    write_results(RESULTS, args.stem, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
