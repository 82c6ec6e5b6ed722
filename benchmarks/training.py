"""Training benchmark on the demo data: dense vs Kronecker U-Net (the demo preset's models and pipeline).

Run from the repo root: ``python -m benchmarks.training [--quick]``. Writes benchmarks/results/training.json and
training.md.

Measured, for the dense U-Net and its Kronecker version (n = 2), with the demo preset's crop, batch, loss,
phase augmentation and zero-filled start:
- throughput: training slices per second over ``--steps`` steps (after warm-up), through the real training
  DataLoader (``ReconDataModule``: h5 read, crop, mask, FFTs, normalisation, phase rotation; one prefetching
  worker by default, ``--num-workers 0`` loads in the training process) and the real step (forward, composite
  loss, backward, Adam, EMA update);
- input-pipeline share: the time spent waiting for the next batch / the whole step time (target <= 10%);
- convergence: both models trained with Lightning for the same steps, validated every ``--val-every`` steps; the
  number of steps each needs to reach the dense model's *final* validation PSNR (target: Kronecker <= dense).
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
from kronify.mri.data import build_datasets
from kronify.mri.demo import build_demo_dataset
from kronify.mri.evaluate import machine_description
from kronify.mri.losses import CompositeLoss
from kronify.mri.presets import get_preset
from kronify.mri.training import ReconDataModule, ReconModule, ZeroFilledStart, make_trainer

RESULTS = Path(__file__).resolve().parent / "results"


def _model(kron: bool, preset) -> torch.nn.Module:
    spec = preset.model("unet")
    net = zoo.create_kron(spec.zoo_name, **spec.overrides)[0] if kron else zoo.create(spec.zoo_name, **spec.overrides)
    return ZeroFilledStart(net, correction=spec.correction) if preset.zero_filled_start else net


def _datamodule(datasets, preset, seed: int) -> ReconDataModule:
    return ReconDataModule(datasets["train"], datasets["val"], datasets["test"], batch_size=preset.batch_size,
                           seed=seed, num_workers=preset.num_workers, eval_batch_size=preset.eval_batch_size,
                           phase_augment=preset.phase_augment)


def throughput(datasets, preset, kron: bool, steps: int, warmup: int = 3) -> dict:
    """Slices/s of real training steps and the share of time spent waiting for batches."""
    torch.manual_seed(0)
    module = ReconModule(_model(kron, preset), CompositeLoss(preset.alpha, preset.beta, preset.gamma),
                         lr=preset.lr, ema_decay=preset.ema_decay)
    opt = torch.optim.Adam(module.model.parameters(), lr=preset.lr)
    loader = iter(_datamodule(datasets, preset, seed=0).make_train_loader(warmup + steps))
    wait = total = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        loss, _ = module.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.ema.update(module.model)
        t2 = time.perf_counter()
        if i >= warmup:
            wait, total = wait + (t1 - t0), total + (t2 - t0)
    slices = steps * preset.batch_size
    return {"slices_per_s": slices / total, "step_ms": 1e3 * total / steps, "input_share": wait / total,
            "params": sum(p.numel() for p in module.model.parameters())}


def convergence(datasets, preset, kron: bool, steps: int, val_every: int, out: Path) -> list[dict]:
    """Validation history (EMA weights) of a Lightning run of ``steps`` steps."""
    pl.seed_everything(0, verbose=False)
    module = ReconModule(_model(kron, preset), CompositeLoss(preset.alpha, preset.beta, preset.gamma),
                         lr=preset.lr, milestones=preset.milestones(steps), ema_decay=preset.ema_decay)
    trainer = make_trainer(out, max_steps=steps, val_every=val_every, ckpt_every=steps, accelerator="cpu",
                           precision="32-true", progress_bar=False)
    trainer.fit(module, datamodule=_datamodule(datasets, preset, seed=0))
    return module.history


def steps_to_reach(history: list[dict], target: float) -> int | None:
    return next((h["step"] for h in history if h["val_psnr"] >= target - 1e-9), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per model (default 30)")
    parser.add_argument("--train-steps", type=int, default=None, help="convergence run length (default 400)")
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--num-workers", type=int, default=1,
                        help="DataLoader workers (1: one prefetching worker; the demo preset itself uses 0 because "
                             "its minute-long runs do not amortise worker start-up)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 30)
    train_steps = args.train_steps or (50 if args.quick else 400)
    preset = get_preset("demo", num_workers=args.num_workers)
    cache = Path(args.cache_dir or os.environ.get("KRONIFY_CACHE") or Path.home() / ".cache" / "kronify")
    build = preset.demo_build
    root = build_demo_dataset(cache / "bench-demo", **build).root
    work = cache / "bench-runs"
    datasets = build_datasets(root, work / "split.json", crop=preset.crop, accelerations=4,
                              num_slices=preset.num_slices)

    result: dict = {"machine": machine_description(),
                    "preset": preset.name, "crop": preset.crop, "batch_size": preset.batch_size, "models": {}}
    for kron in (False, True):
        name = "kron_unet_demo" if kron else "unet_demo"
        t = throughput(datasets, preset, kron, steps)
        history = convergence(datasets, preset, kron, train_steps, args.val_every, work / name)
        result["models"][name] = {**t, "history": history}
        print(f"{name}: {t['slices_per_s']:.1f} slices/s, {t['step_ms']:.0f} ms/step, input pipeline "
              f"{t['input_share']:.1%} of the step, final val PSNR {history[-1]['val_psnr']:.2f} dB", flush=True)
    dense, kron = result["models"]["unet_demo"], result["models"]["kron_unet_demo"]
    target = dense["history"][-1]["val_psnr"]
    result["target_val_psnr"] = target
    result["steps_to_target"] = {"unet_demo": steps_to_reach(dense["history"], target),
                                 "kron_unet_demo": steps_to_reach(kron["history"], target)}
    k_steps = result["steps_to_target"]["kron_unet_demo"]
    result["kron_no_more_steps"] = k_steps is not None and k_steps <= result["steps_to_target"]["unet_demo"]
    result["input_share_ok"] = max(dense["input_share"], kron["input_share"]) <= 0.10

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# Training benchmark (demo data, dense vs Kronecker U-Net)", "",
        f"Machine: {result['machine']}. Demo preset: crop {preset.crop}, batch {preset.batch_size}; "
        f"{preset.num_workers} loader workers; {steps} timed steps, {train_steps}-step convergence runs validated every {args.val_every} steps.", "",
        "| model | params | slices/s | ms/step | input pipeline share (target <= 10%) | final val PSNR | "
        "steps to dense's final val PSNR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        md.append(f"| {name} | {m['params']} | {m['slices_per_s']:.1f} | {m['step_ms']:.0f} | "
                  f"{m['input_share']:.1%} | {m['history'][-1]['val_psnr']:.2f} | "
                  f"{result['steps_to_target'][name] or 'not reached'} |")
    md += ["", f"Target val PSNR (dense final): {target:.2f} dB. Kronecker reaches it in no more steps than dense: "
               f"{'yes' if result['kron_no_more_steps'] else 'no'}. Input pipeline <= 10% of a step: "
               f"{'yes' if result['input_share_ok'] else 'no'}.", ""]
    (RESULTS / "training.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
