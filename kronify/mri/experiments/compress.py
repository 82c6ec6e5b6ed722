"""Compress a finished dense run into a Kronecker run that matches it: warm start, then distillation.

:func:`compress_run` takes a dense run folder (any family) and writes a normal run folder:

1. the dense model is rebuilt and its EMA weights loaded (the teacher);
2. a copy is converted with ``kronify.convert`` (the family's Kronecker settings, ``n`` or a ``budget``) and
   warm-started from the teacher's weights, calibrated on training slices (or weights only);
3. the copy is trained for ``steps`` by :class:`~kronify.mri.training.distill.DistillReconModule` (the teacher's
   output, the ground truth or both) under the dense run's preset, protocol, masks and split, then tested.

The folder holds what any run holds (metrics.json, CSVs, checkpoints/last.ckpt, ...) plus ``kron/``
(``kronify.save``: the conversion and the final EMA weights), from which ``recipes/evaluate.py`` rebuilds the
model. metrics.json records the teacher's folder, its steps and scores, and the compression settings.
kronify.mri never imports zoo: the caller passes the models (:class:`ZooModels`).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

import kronify
from kronify.config import CONFIG_ATTRIBUTE
from kronify.mri.errors import RecipeError, RunError
from kronify.mri.experiments.jobs import Task
from kronify.mri.experiments.presets import Preset, get_preset
from kronify.mri.experiments.run import Hardware, RunSpec, side_by_side, train_and_test
from kronify.mri.experiments.run_folder import RunRecord
from kronify.mri.experiments.setup import Data, MaskSettings, is_global_zero, prepare_data
from kronify.mri.experiments.study import reuses_finished_run, seed_runs
from kronify.mri.training.checkpoint import last_checkpoint
from kronify.mri.training.distill import DistillWeights, converted_layers
from kronify.mri.training.wrappers import ZeroFilledStart

__all__ = ["KRON_SAVE", "TARGETS", "CompressSettings", "ZooModels", "compress_run", "compress_tasks",
           "load_compressed", "split_file_of"]

#: The folder of a compressed run that holds its ``kronify.save``.
KRON_SAVE = "kron"
#: What the student learns from: the loss weights (teacher, ground truth) of each choice.
TARGETS = {"teacher": (1.0, 0.0), "ground-truth": (0.0, 1.0), "both": (0.5, 0.5)}
#: The default distillation length, as a fraction of the dense run's steps.
DEFAULT_FRACTION = 0.2


@dataclass(frozen=True)
class CompressSettings:
    """How a dense run is compressed.

    ``kron_n`` (>= 2) converts every layer the family's Kronecker model converts; ``budget`` (0 < b < 1) instead
    keeps that fraction of the dense parameters, with more terms where the calibrated error says a layer needs
    them (``kronify.convert(budget=)``). ``warm_start``: ``calibrated`` (fit to the layers' inputs on
    ``calibration_batches`` training batches) or ``weights`` (the nearest Kronecker sum). ``steps``: distillation
    steps (None: ``fraction`` of the dense run's, at least 1; 0: the warm start alone). ``target``: a key of
    :data:`TARGETS` (default both: in the study it was never worse than the teacher alone and closed MoDL's gap,
    docs/results/compress_trained.md); ``features``: the weight of matching every converted layer's output.
    ``lr`` None: the preset's.
    """

    kron_n: int = 2
    budget: float | None = None
    warm_start: str = "calibrated"
    calibration_batches: int = 32
    steps: int | None = None
    fraction: float = DEFAULT_FRACTION
    target: str = "both"
    features: float = 0.0
    lr: float | None = None

    def check(self) -> None:
        """RecipeError naming the setting no run can use."""
        if self.kron_n < 2:
            raise RecipeError(f"--kron-n must be >= 2 for a compressed model, got {self.kron_n}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise RecipeError(f"--budget must lie in (0, 1), got {self.budget}")
        if self.warm_start not in ("calibrated", "weights"):
            raise RecipeError(f"--warm-start must be 'calibrated' or 'weights', got {self.warm_start!r}")
        if self.calibration_batches < 1:
            raise RecipeError(f"--calibration-batches must be >= 1, got {self.calibration_batches}")
        if self.steps is not None and self.steps < 0:
            raise RecipeError(f"--steps must be >= 0, got {self.steps}")
        if not 0 < self.fraction <= 1:
            raise RecipeError(f"--fraction must lie in (0, 1], got {self.fraction}")
        if self.target not in TARGETS:
            raise RecipeError(f"--target must be one of {sorted(TARGETS)}, got {self.target!r}")
        if self.features < 0 or (self.lr is not None and self.lr <= 0):
            raise RecipeError(f"--features must be >= 0 and --lr > 0, got {self.features} and {self.lr}")


@dataclass(frozen=True)
class ZooModels:
    """What compression needs from the model zoo: the family's dense model under a preset (``dense``), the
    conversion settings of its Kronecker variant (``kron_settings``: n, exclude, overrides), its cost for
    metrics.json (``cost``: params, gflops, gflops_size) and the name of a compressed run (``name``)."""

    dense: Callable[[str, Preset], nn.Module]
    kron_settings: Callable[[str, Preset], dict[str, Any]]
    cost: Callable[[nn.Module, Preset], dict[str, Any]]
    name: Callable[[str, Preset, CompressSettings], str]


def split_file_of(run: RunRecord) -> Path:
    """The split.json a run was trained with: in its folder or the nearest folder above (a table's runs share
    the table's)."""
    for folder in (run.path, *run.path.parents[:4]):  # table1: OUT/split.json, runs in OUT/runs/<acc>x/<model>/seed<s>
        if (folder / "split.json").is_file():
            return folder / "split.json"
    raise RunError(f"no split.json in {run.path} or the folders above it: cannot tell the run's training split")


def _check_teacher(run: RunRecord, preset_name: str | None, protocol: str | None) -> Preset:
    info = run.info
    if info.get("compression") is not None:
        raise RecipeError(f"{run.path} is a compressed run (from {info['compression'].get('teacher')}); pass the "
                          "dense run it came from")
    if int(info.get("kron_n") or 0) != 0:
        raise RecipeError(f"{run.path} is a Kronecker run ({info['model']}, kron_n {info['kron_n']}), not a dense "
                          "one; pass a dense run (trained with --kron-n 0)")
    if preset_name is not None and preset_name != info["preset"]:
        raise RecipeError(f"{run.path} was trained under preset {info['preset']!r}, not {preset_name!r}; a "
                          "compressed run keeps its teacher's preset (leave --preset out)")
    if protocol is not None and protocol != run.protocol:
        raise RecipeError(f"{run.path} was trained under protocol {run.protocol!r}, not {protocol!r}; a "
                          "compressed run keeps its teacher's protocol (leave --protocol out)")
    try:
        return get_preset(info["preset"], protocol=run.protocol)
    except ValueError as err:
        raise RunError(f"{run.path / 'metrics.json'}: {err}") from err


def _check_out(out: Path, run: RunRecord, resume: bool) -> None:
    out = out.resolve()
    if out == run.path or run.path in out.parents:
        raise RecipeError(f"--out {out} lies inside the dense run {run.path}; choose a folder outside it")
    if RunRecord.is_finished(out):
        raise RecipeError(f"--out {out} already holds a finished run (metrics.json); choose another --out")
    if not resume and (last_checkpoint(out / "checkpoints") is not None or (out / KRON_SAVE).exists()):
        raise RecipeError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")


def _teacher_data(run: RunRecord, preset: Preset, cache: str | os.PathLike | None) -> Data:
    info = run.info
    masks = MaskSettings(run.protocol, info.get("mask_type") or "random", info.get("center_fraction"),
                         bool(info.get("fixed_mask")))
    data_path = None if info.get("data") == "demo" else run.data_root
    data = prepare_data(preset, split_file_of(run), int(info["acceleration"]), masks, data_path=data_path,
                        cache=cache)
    if info.get("test_files") and sorted(data.datasets["test"].files) != sorted(info["test_files"]):
        raise RunError(f"the test split rebuilt for {run.path} is not the one it was tested on")
    return data


def model_inputs(model: nn.Module, data: Data, preset: Preset, count: int, seed: int) -> Iterator[tuple]:
    """``count`` training batches as the model's positional inputs (the zero-filled image; and mask and k-space
    for a model that uses them), shuffled by ``seed``: calibration inputs for ``kronify.convert``."""
    loader = DataLoader(data.datasets["train"], batch_size=preset.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    kspace = getattr(model, "needs_kspace", False)
    for i, batch in enumerate(loader):
        if i == count:
            return
        yield (batch.input, batch.mask, batch.kspace) if kspace else (batch.input,)


def load_compressed(run: RunRecord, dense: nn.Module) -> nn.Module:
    """``dense`` (freshly built like the teacher) converted and loaded as the compressed run ``run`` saved it."""
    save = run.path / KRON_SAVE
    if not save.is_dir():
        raise RunError(f"{run.path} is a compressed run without its {KRON_SAVE}/ folder (kronify.save)")
    return kronify.load(dense, save)


def _student(teacher: nn.Module, family: str, preset: Preset, settings: CompressSettings, data: Data, seed: int,
             models: ZooModels) -> tuple[nn.Module, Any]:
    """The teacher's Kronecker copy, warm-started; returns (student, conversion report).

    A short-run wrapper (ZeroFilledStart) is not converted: its inner network is, because the family's Kronecker
    settings name that network's layers. The report's config (saved in ``kron/``) is therefore relative to the
    inner network, while the saved weights and the record of converted layers name the whole model; kronify.load
    reads the record, so loading onto the whole dense model works (tests/mri/experiments/test_compress.py)."""
    student = copy.deepcopy(teacher)
    kwargs = {k: v for k, v in models.kron_settings(family, preset).items() if v is not None}
    kwargs["n"] = settings.kron_n
    calibration = (list(model_inputs(teacher, data, preset, settings.calibration_batches, seed))
                   if settings.warm_start == "calibrated" else None)
    network = student.model if isinstance(student, ZeroFilledStart) else student  # the settings name its layers
    report = kronify.convert(network, warm_start=True, calibration=calibration, budget=settings.budget, **kwargs)
    return student, report


def compress_run(dense_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: CompressSettings,
                 models: ZooModels, *, seed: int = 0, hardware: Hardware = Hardware(), resume: bool = False,
                 preset_name: str | None = None, protocol: str | None = None, precision: str | None = None,
                 cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Compress the dense run in ``dense_dir`` into ``out_dir`` (see the module docstring); returns the new run's
    metrics.json content ({} on a non-zero DDP rank). Every check (the run is dense and finished, its preset and
    protocol are the ones asked for, ``out_dir`` holds no run unless ``resume``) runs before anything is written.
    ``precision`` None: the preset's.

    Under DDP every rank converts the teacher itself (the same seed and calibration batches give the same model;
    DDP starts every rank from rank 0's weights), so no rank waits for another's files; only rank 0 writes."""
    settings.check()
    run = RunRecord.open(dense_dir)
    preset = _check_teacher(run, preset_name, protocol)
    out = Path(out_dir)
    rank_zero = is_global_zero()  # under DDP every rank compresses the same way; rank 0 checks and writes
    if rank_zero:
        _check_out(out, run, resume)
    family = run.info["family"]
    dense_steps = int(run.info.get("steps") or preset.steps_for(family))
    steps = settings.steps if settings.steps is not None else max(1, round(settings.fraction * dense_steps))
    data = _teacher_data(run, preset, cache)
    teacher = run.load_ema_weights(models.dense(family, preset))
    pl.seed_everything(seed, workers=True, verbose=False)
    save = out / KRON_SAVE
    if resume and save.is_dir():  # the conversion saved before training: its model and (remembered by load) config
        student = load_compressed(RunRecord(out, {}), models.dense(family, preset))
        report, config, convert_seconds = None, getattr(student, CONFIG_ATTRIBUTE), None
    else:
        started = time.perf_counter()
        student, report = _student(teacher, family, preset, settings, data, seed, models)
        convert_seconds = time.perf_counter() - started
        config = report.config
        if rank_zero:
            kronify.save(student, save, config)
    teacher_weight, target_weight = TARGETS[settings.target]
    weights = DistillWeights(teacher_weight, target_weight, settings.features,
                             tuple(converted_layers(student)) if settings.features > 0 else ())
    name = models.name(family, preset, settings)
    compression = {
        **asdict(settings), "steps": steps, "teacher": str(run.path), "teacher_model": run.model,
        "teacher_steps": dense_steps, "teacher_params": run.info.get("params"), "fraction_of_dense_steps": steps / dense_steps,
        "teacher_psnr": run.mean("psnr"), "teacher_ssim": run.mean("ssim"), "distill": weights.as_dict(),
        "convert_seconds": convert_seconds,  # the calibrated warm start (None: resumed from kron/)
        **({} if report is None else _fit_summary(report)),
    }
    info = {"model": name, "kron_n": settings.kron_n, "algebra": "learned", "acceleration": run.info["acceleration"],
            **models.cost(student, preset), "data": run.info.get("data"), "data_root": run.info.get("data_root"),
            "mask_type": run.info.get("mask_type"), "center_fraction": run.info.get("center_fraction"),
            "fixed_mask": run.info.get("fixed_mask"), "kron_save": KRON_SAVE, "compression": compression}
    lr = settings.lr or preset.lr
    schedule = replace(preset, lr=lr, schedule="cosine", warmup_frac=0.05, precision=precision or preset.precision)
    result = train_and_test(student, schedule, data.datasets, out, family=family, seed=seed, max_steps=steps,
                            resume=resume, hardware=hardware, info=info, teacher=teacher, distill=weights)
    if result:  # rank 0: the final EMA weights beside the conversion (and its config), for evaluation and reuse
        kronify.save(RunRecord.open(out).load_ema_weights(student), save, config)
    return result


def _fit_summary(report: Any) -> dict[str, Any]:
    """The warm start's errors, averaged over the converted layers: relative weight error (the nearest Kronecker
    sum's or the calibrated fit's) and, when calibrated, the held-out relative output error."""
    rows = [r for r in report.rows if r.status == "converted"]
    return {"layers": len(rows), "params_kept": report.params_after / report.params_before,
            "weight_error_mean": _mean([r.warm_start_error for r in rows]),
            "output_error_mean": _mean([r.output_error for r in rows])}


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def compress_tasks(pairs: Sequence[tuple[RunSpec, RunSpec]], seeds: Sequence[int], models: ZooModels, jobs: int = 1,
                   settings: CompressSettings = CompressSettings(), cache: str | os.PathLike | None = None,
                   after: Mapping[Path, Task] | None = None) -> list[Task]:
    """For each (dense row, compressed row) and seed, a task that compresses the dense row's run of that seed into
    the compressed row's folder (recipes/table1.py's compressed rows; run them with
    :func:`kronify.mri.experiments.jobs.run_tasks` and ``jobs``). A task waits on the task in ``after`` keyed by
    its teacher's folder (the teacher's training), if there is one. With ``resume`` (the compressed spec's),
    finished runs are reused (no task) and unfinished ones continue."""
    after = after or {}
    tasks = []
    for dense, compressed in pairs:
        for teacher, spec in zip(seed_runs(dense, seeds), seed_runs(compressed, seeds)):
            if reuses_finished_run(spec):
                continue
            training = (after[teacher.out_dir],) if teacher.out_dir in after else ()
            tasks.append(Task(compress_run, (teacher.out_dir, spec.out_dir, settings, models),
                              {"seed": spec.seed, "hardware": side_by_side(spec.hardware, jobs), "resume": spec.resume,
                               "cache": cache},
                              after=training))
    return tasks
