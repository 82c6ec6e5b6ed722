"""Conversion at scale: `kronify.convert(model, n=2, warm_start=True)` on LLaMA-shaped models (transformers
LlamaForCausalLM from a LlamaConfig) from ~50 M to ~1 B parameters, in memory and from a safetensors checkpoint.

Run from the repo root: `python -m benchmarks.convert [--configs 50M,150M,536M,1B] [--before PATH]`. Every
measurement runs in a fresh subprocess, which reports:
- convert wall / CPU seconds (CPU: all threads), and wall seconds per Gparam of the dense model;
- peak RSS growth: `resource.getrusage` max RSS at the end minus the same before the model is built (after the
  imports and a tiny warm-up conversion), as a ratio to the dense model's bytes; for the checkpoint path also to the
  converted model plus its largest dense layer, what it must hold at least.
"memory": the model is built on the meta device, `to_empty` on the CPU, filled by uniform_ (no random-init cost:
the warm start's cost does not depend on the values), then converted in place. "checkpoint": a safetensors file of
that model is written by another subprocess (not measured), the model is built on the meta device and converted
with `checkpoint=`. `--before PATH` also runs the in-memory path with the kronify found at PATH (e.g. a git
worktree of an older commit) for comparison. Writes benchmarks/results/convert.json and convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see examples/convert_models.py); recorded in the results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CONFIGS = {  # name: (hidden, layers, intermediate, heads); vocab 32000, untied head, as LLaMA
    "50M": (512, 8, 1376, 8),
    "150M": (1024, 8, 2816, 16),
    "536M": (2048, 8, 5632, 16),
    "1B": (2048, 16, 5632, 16),
}
VOCAB = 32000
TARGET_S_PER_GPARAM = 10.0
TARGET_RATIO = 1.3


def llama_config(name: str):
    import transformers

    hidden, layers, inter, heads = CONFIGS[name]
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                    num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                                    max_position_embeddings=2048, tie_word_embeddings=False)


def build_filled(config, dtype):
    """The model of a LlamaConfig with every tensor filled by uniform_ (cheap), built without paying for
    transformers' init."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.uniform_(-0.02, 0.02)
    return model


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(spec: dict) -> dict:
    """One measurement (run in a fresh process): see the module docstring."""
    import time

    if spec.get("kronify_path"):  # ahead of the working directory, which `python -m` puts first
        sys.path.insert(0, spec["kronify_path"])
    import torch
    import transformers
    from torch import nn

    import kronify

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    tiny = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=16, num_attention_heads=2,
                                    vocab_size=32)
    kronify.convert(build_filled(tiny, dtype), n=2, warm_start=True)  # lazy imports and initialisation: before
    base = _max_rss()  # the baseline (transformers imports its modeling modules on first use: ~160 MB)
    if spec["path"] == "checkpoint":
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(llama_config(spec["config"])).to(dtype)
        kwargs = {"checkpoint": spec["checkpoint"]}
    else:
        model = build_filled(llama_config(spec["config"]), dtype)
        kwargs = {}
    dense_params = sum(p.numel() for p in model.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    wall, cpu = time.perf_counter(), time.process_time()
    report = kronify.convert(model, n=2, warm_start=True, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    grown = _max_rss() - base
    after_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**spec, "kronify": os.path.dirname(os.path.dirname(kronify.__file__)), "params": dense_params, "params_after": report.params_after, "dense_bytes": dense_bytes,
            "converted_bytes": after_bytes, "largest_layer_bytes": largest, "convert_wall_s": wall,
            "convert_cpu_s": cpu, "s_per_gparam": wall / dense_params * 1e9, "peak_rss_growth": grown,
            "ratio_dense": grown / dense_bytes, "ratio_converted_plus_largest": grown / (after_bytes + largest),
            "converted_layers": len(report.converted), "dtypes_after": sorted({str(p.dtype) for p in model.parameters()})}


def write_checkpoint(name: str, dtype: str, path: str) -> None:
    """Save the filled model's state dict as one safetensors file (run in a subprocess of its own)."""
    import torch
    from safetensors.torch import save_file

    model = build_filled(llama_config(name), getattr(torch, dtype))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def _run(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "benchmarks.convert", *args], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def measure(spec: dict) -> dict:
    result = json.loads(_run(["--child", json.dumps(spec)]))
    print(f"{spec['config']:>5} {spec['dtype']:8} {spec['path']:10} {spec.get('code', 'now'):6} "
          f"{result['convert_wall_s']:7.2f} s  {result['s_per_gparam']:6.2f} s/Gparam  "
          f"x{result['ratio_dense']:.2f} of dense", flush=True)
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# convert benchmark: LLaMA-shaped models, n=2, warm_start=True",
        "",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, torch {m['torch']} with "
        f"{result['threads']} threads (OMP_WAIT_POLICY={m['omp_wait_policy']}), transformers "
        f"{m['transformers']}; load average at start {m['load_average_at_start']}, at the end {m['load_after']} "
        "(the machine is shared: wall time grows with the load, CPU time much less).",
        "Each row is a fresh process. RSS growth: peak RSS minus the baseline before the model is built (so the "
        "in-memory rows include building the dense model, 1.00x at least). `memory`: converted in place; "
        "`checkpoint`: built on the meta device, converted from a safetensors file.",
        "",
        "| model | params | dtype | path | code | convert wall (s) | CPU (s) | s / Gparam | peak RSS growth "
        "(GiB) | x dense bytes | x (converted + largest layer) |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:,.0f} M | {r['dtype']} | {r['path']} | {r.get('code', 'now')} | "
            f"{r['convert_wall_s']:.2f} | {r['convert_cpu_s']:.2f} | {r['s_per_gparam']:.2f} | "
            f"{r['peak_rss_growth'] / 2**30:.2f} | {r['ratio_dense']:.2f} | {r['ratio_converted_plus_largest']:.2f} |")
    now = [r for r in result["rows"] if r.get("code", "now") == "now" and r["dtype"] == "float32"]
    worst_s = max(r["s_per_gparam"] for r in now if r["path"] == "memory")
    worst_ratio = max(r["ratio_dense"] for r in now if r["path"] == "memory")
    lines += ["", f"Targets (issue 19): <= {TARGET_S_PER_GPARAM:g} s per Gparam, in-memory peak <= {TARGET_RATIO}x "
                  f"the dense model. Worst float32 in-memory row here: {worst_s:.2f} s/Gparam, x{worst_ratio:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", default=None, help="a checkout whose kronify to time too (in-memory path)")
    parser.add_argument("--before-configs", default="150M,536M")
    parser.add_argument("--bf16-configs", default="536M")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    if args.write_checkpoint:
        write_checkpoint(*args.write_checkpoint)
        return {}

    import torch
    import transformers

    from benchmarks._common import RESULTS, machine, write_results

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kronify-bench-") as tmp:
        for name in args.configs.split(","):
            spec = {"config": name, "dtype": "float32", "threads": args.threads}
            rows.append(measure({**spec, "path": "memory"}))
            ckpt = os.path.join(tmp, f"{name}.safetensors")
            _run(["--write-checkpoint", name, "float32", ckpt])
            rows.append(measure({**spec, "path": "checkpoint", "checkpoint": ckpt}))
            os.remove(ckpt)
            if name in args.bf16_configs.split(","):
                rows.append(measure({**spec, "dtype": "bfloat16", "path": "memory"}))
            if args.before and name in args.before_configs.split(","):
                rows.append(measure({**spec, "path": "memory", "code": "before",
                                     "kronify_path": os.path.abspath(args.before)}))
    result = {
        "settings": {"n": 2, "warm_start": True},
        "threads": args.threads,
        "rows": rows,
        "machine": machine(transformers=transformers.__version__,
                           memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                           load_after=round(os.getloadavg()[0], 2), load_before=round(load_before, 2),
                           torch_threads=torch.get_num_threads()),
    }
    write_results(args.out or RESULTS, "convert", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
