"""Training benchmark on the demo data: time per step and slices/s of every demo model, dense and Kronecker.

Run from the repo root: ``python -m benchmarks.training [--quick] [--convergence]``. Writes
benchmarks/results/training.json and training.md.

For every trained row of the demo table (the demo preset's model, crop, batch, loss, phase augmentation and
zero-filled start), through the real training DataLoader (``ReconDataModule``: h5 read, crop, mask, FFTs,
normalisation, phase rotation; in the training process, as the demo runs) and the real step (forward,
composite loss, backward, Adam, EMA update):

- ms per step and training slices per second over ``--steps`` steps after a warm-up, with 1 and with 2 torch
  threads (the speed levers "thread settings"), with the model and its input in ``channels_last`` memory
  format (2 threads), and as one of two runs side by side in worker processes of 1 thread each (what
  ``--jobs 2`` does; the ratio against one 2-thread run is the table's speed-up);
- the input pipeline's share of the step.

Each model trains on what the demo trains it on (whole slices, or the preset's training patches).

``--convergence`` also trains the dense and Kronecker fastMRI U-Nets with Lightning and reports the steps each
needs to reach the dense model's final validation PSNR.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

import zoo
from kronify.mri.data.datasets import build_datasets
from kronify.mri.data.demo import build_demo_dataset
from kronify.mri.experiments.jobs import machine_description, run_calls
from kronify.mri.losses import CompositeLoss
from kronify.mri.experiments.presets import Preset, get_preset
from kronify.mri.paper import TABLE1_ROWS
from kronify.mri.training.data_module import ReconDataModule
from kronify.mri.training.module import ReconModule
from kronify.mri.training.trainer import make_trainer
from kronify.mri.training.wrappers import ZeroFilledStart, reconstruct

RESULTS = Path(__file__).resolve().parent / "results"

#: (family, Kronecker n, algebra): every trained row of recipes/table1.py (the demo trains those its preset's
#: ``table_rows`` name)
ROWS = [(family, n, algebra) for _, family, n, algebra in TABLE1_ROWS if family]

#: Before this demo set-up (benchmarks/results/training.json of commit 7536d71, 2 threads): ms/step, slices/s and
#: demo steps of the previous demo models (LB U-Net at its 41 k-parameter widths, MoDL at 16 features, SwinMR on
#: whole slices).
BEFORE = {"lbunet_small": (108, 37.0, 400), "efficient_unet": (253, 15.8, 300), "unet_ddpm_demo": (390, 10.2, 300),
          "kron_unet_ddpm_demo": (502, 8.0, 300), "unet_demo": (169, 23.7, 400), "kron_unet_demo": (223, 17.9, 400),
          "kron_unet_demo_complex": (187, 21.3, 400), "swinmr_demo": (411, 9.7, 150),
          "kron_swinmr_demo": (488, 8.2, 150), "modl_demo": (153, 26.2, 600), "kron_modl_demo": (121, 33.1, 600)}


def row_name(preset: Preset, family: str, n: int, algebra: str) -> str:
    return zoo.variant_name(preset.model(family).zoo_name, n, algebra)


def build(preset: Preset, family: str, n: int = 0, algebra: str = "learned") -> torch.nn.Module:
    """The demo table's model for a row, wrapped as the demo wraps it."""
    spec = preset.model(family)
    net = zoo.create_kron(spec.zoo_name, n=n, algebra=algebra, **spec.overrides)[0] if n \
        else zoo.create(spec.zoo_name, **spec.overrides)
    if not preset.zero_filled_start:
        return net
    return ZeroFilledStart(net, correction=spec.correction, gain_init=spec.start_gain)


def _datamodule(datasets, preset: Preset, seed: int, family: str | None = None) -> ReconDataModule:
    """The demo's data module; with ``family``, its training slices cut to the family's training patches."""
    train = datasets["train"]
    patch = preset.model(family).train_patch if family else None
    if patch:
        train = train.with_transform(train.transform.with_patch(patch))
    return ReconDataModule(train, datasets["val"], datasets["test"], batch_size=preset.batch_size,
                           seed=seed, num_workers=preset.num_workers, eval_batch_size=preset.eval_batch_size,
                           phase_augment=preset.phase_augment, augment=preset.augment)


def throughput(datasets, preset: Preset, model: torch.nn.Module, steps: int, *, threads: int,
               channels_last: bool = False, warmup: int = 3, family: str | None = None) -> dict:
    """ms/step and slices/s of real training steps, and the share of the step spent waiting for the batch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        module = ReconModule(model, CompositeLoss(preset.alpha, preset.beta, preset.gamma), lr=preset.lr,
                             ema_decay=preset.ema_decay, lpips=None, log_images=False)
        opt = torch.optim.Adam(module.model.parameters(), lr=preset.lr)
        loader = iter(_datamodule(datasets, preset, seed=0, family=family).make_train_loader(warmup + steps))
        wait = total = 0.0
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = next(loader)
            if channels_last:
                batch = batch._replace(input=batch.input.contiguous(memory_format=fmt))
            t1 = time.perf_counter()
            loss, _ = module.loss_fn(reconstruct(module.model, batch).float(), batch.target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            module.ema.update(module.model)
            t2 = time.perf_counter()
            if i >= warmup:
                wait, total = wait + (t1 - t0), total + (t2 - t0)
    finally:
        torch.set_num_threads(previous)
    return {"slices_per_s": steps * preset.batch_size / total, "step_ms": 1e3 * total / steps,
            "input_share": wait / total}


def _demo_datasets(root: Path, split: Path, preset: Preset) -> dict:
    return build_datasets(root, split, crop=preset.crop, accelerations=4, num_slices=preset.num_slices)


def side_by_side_worker(root: Path, split: Path, family: str, n: int, algebra: str, steps: int) -> dict:
    """:func:`throughput` of one row in a worker process (run two at once with kronify.mri.experiments.jobs.run_calls)."""
    preset = get_preset("demo")
    return throughput(_demo_datasets(root, split, preset), preset, build(preset, family, n, algebra), steps,
                      threads=torch.get_num_threads(), family=family)


def convergence(datasets, preset: Preset, kron: bool, steps: int, val_every: int, out: Path) -> list[dict]:
    """Validation history (EMA weights) of a Lightning run of the fastMRI U-Net for ``steps`` steps."""
    pl.seed_everything(0, verbose=False)
    module = ReconModule(build(preset, "unet", 2 if kron else 0), CompositeLoss(preset.alpha, preset.beta, preset.gamma),
                         lr=preset.lr, milestones=preset.milestones(steps), ema_decay=preset.ema_decay)
    trainer = make_trainer(out, max_steps=steps, val_every=val_every, ckpt_every=steps, accelerator="cpu",
                           precision="32-true", progress_bar=False)
    trainer.fit(module, datamodule=_datamodule(datasets, preset, seed=0))
    return module.history


def steps_to_reach(history: list[dict], target: float) -> int | None:
    return next((h["step"] for h in history if h["val_psnr"] >= target - 1e-9), None)


def _markdown(result: dict, preset: Preset, steps: int) -> list[str]:
    md = [
        "# Training benchmark (demo data, every demo model, dense vs Kronecker)", "",
        f"Machine: {result['machine']}. Demo preset: crop {preset.crop}, batch {preset.batch_size}, loader in the "
        f"training process (as the demo runs), each model on the demo's training patches where it has them; "
        f"{steps} timed steps after 3 warm-up steps. `python -m benchmarks.training`.", "",
        "| model | params | ms/step (2 threads) | slices/s (2 threads) | ms/step (1 thread) | ms/step (2 threads, "
        "channels_last) | ms/step (2 runs side by side, 1 thread each) | table speed-up of side by side | input "
        "pipeline share | demo steps | demo training time (side by side) | before: ms/step (2 threads), slices/s, "
        "demo steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        two, one, cl, side = m["threads2"], m["threads1"], m["channels_last"], m["side_by_side"]
        before = BEFORE.get(name)
        md.append(f"| {name} | {m['params']:,} | {two['step_ms']:.0f} | {two['slices_per_s']:.1f} | "
                  f"{one['step_ms']:.0f} | {cl['step_ms']:.0f} | {side['step_ms']:.0f} | "
                  f"{2 * two['step_ms'] / side['step_ms']:.2f}x | {two['input_share']:.1%} | {m['demo_steps']} | "
                  f"{m['demo_steps'] * side['step_ms'] / 1e3:.0f} s | "
                  + (f"{before[0]} ms, {before[1]}, {before[2]} |" if before else "- |"))
    demo_rows = {k: m for k, m in result["models"].items() if m.get("in_demo")}
    total = sum(m["demo_steps"] * m["side_by_side"]["step_ms"] / 1e3 for m in demo_rows.values())
    md += ["", f"The demo's {len(demo_rows)} rows, two at a time: {total:.0f} s of runs, about {total / 2:.0f} s of "
           "training wall time (validation, test and figures come on top; docs/results/demo_table1.md breaks down "
           "a whole `make demo`). Before: the numbers of the previous demo set-up (benchmarks/results/training.json "
           "of commit 7536d71); LB U-Net, MoDL and SwinMR changed size or input since (BEFORE in "
           "benchmarks/training.py).", ""]
    if "steps_to_target" in result:
        md += [f"Convergence (fastMRI U-Net, dense vs Kronecker): steps to the dense run's final validation PSNR "
               f"{result['target_val_psnr']:.2f} dB: {result['steps_to_target']}.", ""]
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per model (default 12)")
    parser.add_argument("--convergence", action="store_true", help="also the dense vs Kronecker U-Net convergence runs")
    parser.add_argument("--train-steps", type=int, default=400, help="convergence run length")
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--stem", default="training", help="results file name (benchmarks/results/STEM.{json,md})")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 12)
    preset = get_preset("demo")
    cache = Path(args.cache_dir or os.environ.get("KRONIFY_CACHE") or Path.home() / ".cache" / "kronify")
    root = build_demo_dataset(cache / "bench-demo", **preset.demo_build).root
    work = cache / "bench-runs"
    datasets = _demo_datasets(root, work / "split.json", preset)

    result: dict = {"machine": machine_description(), "preset": preset.name, "crop": preset.crop,
                    "batch_size": preset.batch_size, "steps": steps, "before": BEFORE, "models": {}}
    for family, n, algebra in ROWS:
        name = row_name(preset, family, n, algebra)
        params = sum(p.numel() for p in build(preset, family, n, algebra).parameters())
        runs = {key: throughput(datasets, preset, build(preset, family, n, algebra), steps, threads=t,
                                channels_last=cl, family=family)
                for key, t, cl in (("threads2", 2, False), ("threads1", 1, False), ("channels_last", 2, True))}
        pair = run_calls(side_by_side_worker, [((root, work / "split.json", family, n, algebra, steps), {})] * 2,
                         jobs=2, threads=1)
        runs["side_by_side"] = {k: sum(r[k] for r in pair) / 2 for k in pair[0]}  # per run, mean of the two
        in_demo = any(label in preset.table_rows for label, *row in TABLE1_ROWS if tuple(row) == (family, n, algebra))
        result["models"][name] = {"params": params, "demo_steps": preset.steps_for(family), "in_demo": in_demo,
                                  **runs}
        print(f"{name}: " + ", ".join(f"{k} {v['step_ms']:.0f} ms/step" for k, v in runs.items()), flush=True)
    if args.convergence:
        histories = {k: convergence(datasets, preset, k, args.train_steps, args.val_every, work / f"conv{int(k)}")
                     for k in (False, True)}
        target = histories[False][-1]["val_psnr"]
        result["target_val_psnr"] = target
        result["steps_to_target"] = {("kron" if k else "dense"): steps_to_reach(h, target)
                                     for k, h in histories.items()}

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = _markdown(result, preset, steps)
    (RESULTS / f"{args.stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
