"""kronify.distill: fine-tune a converted (Kronecker) student against its dense teacher, with no labels.

A warm-started Kronecker model is near, not equal to, its dense original; matching the teacher's outputs (and
optionally hidden features) on unlabelled inputs closes the gap. `distill` is the one-call loop; `DistillLoss`,
the optimizer and the schedule are shared with `kronify.distill_lightning.DistillModule` (multi-GPU runs).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kronify.batches import call_model, iterate_batches, move_batch
from kronify.distill_loss import DistillLoss

__all__ = ["DistillLoss", "DistillResult", "check_settings", "distill", "make_optimizer", "train_mode", "warmup_cosine"]

def check_settings(steps: int, lr: float, warmup: float | int, accumulate: int = 1) -> None:
    """ValueError for settings no run can use, before anything runs."""
    if steps < 1 or accumulate < 1 or lr <= 0 or warmup < 0:
        raise ValueError(f"need steps >= 1, accumulate >= 1, lr > 0 and warmup >= 0; got steps={steps}, "
                         f"accumulate={accumulate}, lr={lr}, warmup={warmup}")


def warmup_cosine(steps: int, warmup: float | int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over `warmup` steps (a fraction of `steps` if a float < 1), then cosine
    decay reaching 0 after the last step; for torch.optim.lr_scheduler.LambdaLR."""
    warm = min(steps, round(warmup * steps) if isinstance(warmup, float) and warmup < 1 else int(warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    return factor


def make_optimizer(student: nn.Module, *, steps: int, lr: float, weight_decay: float, warmup: float | int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the student's trainable parameters with the warm-up / cosine schedule (stepped per step)."""
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no parameters that require grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))


def train_mode(student: nn.Module, freeze_norm_stats: bool) -> None:
    """Train mode, with BatchNorm/InstanceNorm (running statistics) modules in eval mode if freeze_norm_stats:
    the teacher's statistics stay right for the student, and small distillation batches don't disturb them."""
    student.train()
    if freeze_norm_stats:
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.eval()


@dataclass
class DistillResult:
    """steps: optimizer steps done in all (resumed ones included); losses: the mean loss of each step;
    evals: (step, eval_fn(student)); seconds: wall time of this call."""
    steps: int
    losses: list[float]
    evals: list[tuple[int, Any]]
    seconds: float


def _stream(batches: Iterable[Any], needed: int) -> Iterator[Any]:
    """The batches, endlessly: a re-iterable (list, DataLoader) starts again when it runs out; a one-shot
    iterator that runs out is an error saying how many batches it gave."""
    it, given = iterate_batches(batches, "distill"), 0
    while True:
        fresh = given
        for batch in it:
            given += 1
            yield batch
        if given == fresh:
            raise ValueError("distill: batches is empty" if not given else
                             f"distill: batches gave nothing when iterated again after {given} batches")
        if it is batches:
            raise ValueError(f"distill: batches ran out after {given} batches but steps * accumulate = {needed} "
                             "are needed; pass a list, a DataLoader or an endless generator")
        it = iter(batches)


def _flags(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in module.modules()]


def _restore(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, training in flags:
        m.training = training


def _guarded(who: str, first: bool, model: nn.Module, batch: Any) -> Any:
    """call_model; on the first batch, a failure becomes an error saying which model rejected its inputs."""
    if not first:
        return call_model(model, batch)
    try:
        return call_model(model, batch)
    except Exception as e:
        raise RuntimeError(f"distill: the {who} failed on the first batch ({type(e).__name__}: {e}); batches "
                           "must hold inputs both models accept (a tensor, a tuple or a dict of keyword inputs)") from e


def _load_checkpoint(path: str | os.PathLike | None, student: nn.Module, steps: int, accumulate: int) -> dict | None:
    """The checkpoint at `path` if it exists, checked against this student and run before anything changes."""
    if path is None or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "student" not in state:
        raise ValueError(f"{os.fspath(path)} is not a distill checkpoint")
    own, saved = student.state_dict(), state["student"]
    bad = sorted(own.keys() ^ saved.keys()) + [k for k in own.keys() & saved.keys() if own[k].shape != saved[k].shape]
    if bad:
        raise ValueError(f"checkpoint {os.fspath(path)} is from a different student: keys missing, unexpected or of "
                         f"another shape: {bad[:10]}")
    if (state["steps"], state["accumulate"]) != (steps, accumulate):
        raise ValueError(f"checkpoint {os.fspath(path)} is from a run with steps={state['steps']}, accumulate="
                         f"{state['accumulate']}; resume it with the same settings")
    return state


def _save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file then os.replace: an interruption never leaves a half-written checkpoint."""
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _evaluate(student: nn.Module, eval_fn: Callable[[nn.Module], Any]) -> Any:
    """eval_fn(student) with the student in eval mode; its modes are restored afterwards."""
    flags = _flags(student)
    student.eval()
    try:
        return eval_fn(student)
    finally:
        _restore(flags)


@dataclass
class _Loop:
    """What one optimizer step needs; `step` runs one."""
    student: nn.Module
    teacher: nn.Module
    objective: DistillLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    teacher_device: torch.device
    dtype: torch.dtype | None
    steps: int
    accumulate: int
    max_grad_norm: float | None

    def step(self, stream: Iterator[Any], first: bool) -> float:
        """One optimizer step over `accumulate` batches (each loss divided by it); the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i in range(self.accumulate):
            batch, check = next(stream), first and i == 0
            with self.objective.hooks(self.student, self.teacher):
                with torch.autocast(self.device.type, self.dtype) if self.dtype else contextlib.nullcontext():
                    with torch.no_grad():
                        t_out = _guarded("teacher", check, self.teacher, move_batch(batch, self.teacher_device))
                    s_out = _guarded("student", check, self.student, move_batch(batch, self.device))
                loss = self.objective(s_out, t_out)
            self.scaler.scale(loss / self.accumulate).backward()
            total += loss.detach()
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total.item() / self.accumulate

    def state(self, step: int, losses: list[float], evals: list[tuple[int, Any]]) -> dict:
        """What an exact resume needs (step * accumulate batches were consumed) and the settings it must match."""
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "step": step, "losses": losses, "evals": evals,
                "steps": self.steps, "accumulate": self.accumulate}

    def resume(self, state: dict, stream: Iterator[Any]) -> tuple[int, list[float], list[tuple[int, Any]]]:
        """Load a checkpoint's states and skip the batches it consumed; (step, losses, evals) so far. The RNG
        state is set last, so what skipping draws (a shuffling DataLoader's seed) does not count."""
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for _ in range(state["step"] * self.accumulate):
            next(stream)
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["step"], list(state["losses"]), [tuple(e) for e in state["evals"]]


def _first_device(module: nn.Module) -> torch.device | None:
    return next((t.device for t in itertools.chain(module.parameters(), module.buffers())), None)


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], *, steps: int,
            lr: float = 1e-3, weight_decay: float = 0.0, warmup: float | int = 0.05,
            loss: str | Callable = "auto", temperature: float = 1.0,
            features: Sequence[str] | Mapping[str, str] | None = None, feature_weight: float = 1.0,
            output: Callable[[Any], Tensor] | None = None,
            accumulate: int = 1, device: str | torch.device | None = None, amp: bool | torch.dtype = False,
            freeze_norm_stats: bool = False, max_grad_norm: float | None = 1.0,
            progress: bool = True, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0,
            eval_fn: Callable[[nn.Module], float | dict] | None = None, eval_every: int = 0,
            seed: int = 0) -> DistillResult:
    """Train `student` (in place) to reproduce `teacher` on `batches` (model inputs, no labels) for `steps`
    optimizer steps of `accumulate` batches each.

    batches: tensors, tuples of positional inputs or dicts of keyword inputs; a list or DataLoader is iterated
    again when it runs out, a generator may be endless. loss: "mse", "l1", "kl" (softened by temperature,
    scaled by T²), "auto" (= "mse", right for any output; use "kl" for classifier logits) or a
    callable(student_out, teacher_out) on `output(model_out)` (default: the tensor, `.logits`, or a tuple's
    first item). features: hidden modules to match too (see DistillLoss). AdamW(lr, weight_decay) with
    `warmup` (fraction of steps if a float < 1, else steps) then cosine decay to 0; gradients clipped to
    max_grad_norm (None: not clipped). device: where the student goes (default: where it is); the teacher runs
    where it is, except that a CPU teacher is moved to `device` for the run and back. amp: autocast, True for
    bf16 on the CPU / fp16 (with a GradScaler) on CUDA, or a dtype. freeze_norm_stats: BatchNorm-style
    running statistics are left as they are (off by default: a Kronecker student's activations differ from the
    teacher's, and re-estimating the statistics was measured to help, a lot after a weight-only warm start —
    docs/results/compress_trained.md). The teacher is run in eval mode under no_grad and left exactly
    as it was, and so are both models' train/eval flags.

    checkpoint: a file written (atomically) every checkpoint_every steps and at the end; if it exists, the run
    resumes from it and, for batches that come in the same order (a list, a seeded generator or DataLoader),
    ends bit-identical to an uninterrupted run. eval_fn(student) runs in eval mode every eval_every steps and
    at the end. The global torch RNG is seeded with `seed`."""
    check_settings(steps, lr, warmup, accumulate)
    objective = DistillLoss(loss, temperature=temperature, features=features, feature_weight=feature_weight,
                            output=output)
    objective.check(student, teacher)
    saved = _load_checkpoint(checkpoint, student, steps, accumulate)
    started = time.perf_counter()
    dev = torch.device(device) if device is not None else _first_device(student) or torch.device("cpu")
    home = {t.device for t in itertools.chain(teacher.parameters(), teacher.buffers())}
    move_teacher = home == {torch.device("cpu")} and dev.type != "cpu"
    dtype = amp if isinstance(amp, torch.dtype) else None
    if amp is True:  # bf16 on the CPU (no fast fp16 kernels there), fp16 with a GradScaler elsewhere
        dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16
    student_flags, teacher_flags = _flags(student), _flags(teacher)
    try:
        student.to(dev)
        if move_teacher:
            teacher.to(dev)
        teacher.eval()
        train_mode(student, freeze_norm_stats)
        optimizer, scheduler = make_optimizer(student, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup)
        scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16 and dev.type == "cuda")
        loop = _Loop(student, teacher, objective, optimizer, scheduler, scaler, dev, _first_device(teacher) or dev,
                     dtype, steps, accumulate, max_grad_norm)
        torch.manual_seed(seed)
        stream = _stream(batches, steps * accumulate)
        start, losses, evals = loop.resume(saved, stream) if saved else (0, [], [])
        with tqdm(total=steps, initial=start, desc="distill", disable=not progress) as bar:
            for step in range(start + 1, steps + 1):
                losses.append(loop.step(stream, first=step == start + 1))
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                bar.update()
                if eval_fn is not None and (step == steps or eval_every > 0 and step % eval_every == 0):
                    evals.append((step, _evaluate(student, eval_fn)))
                if checkpoint is not None and (step == steps or checkpoint_every > 0 and step % checkpoint_every == 0):
                    _save_checkpoint(checkpoint, loop.state(step, losses, evals))
    finally:
        _restore(student_flags)
        _restore(teacher_flags)
        if move_teacher:
            teacher.to("cpu")
    return DistillResult(steps, losses, evals, time.perf_counter() - started)
