"""kronify.distill (and its Lightning module): a converted student learns its dense teacher without labels."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import kronify
from kronify.distill import DistillLoss, distill, warmup_cosine

FAST = dict(progress=False, lr=1e-2)


def _teacher(out: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, out))


def _student(teacher: nn.Module) -> nn.Module:
    student = copy.deepcopy(teacher)
    kronify.convert(student, n=2, warm_start=True)
    return student


def _batches(count: int = 6, size: int = 16, dim: int = 8) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, dim, generator=g) for _ in range(count)]


def _hooks(*models: nn.Module) -> list[int]:
    """Forward hooks per module (kronify's parametrized layers have hooks of their own)."""
    return [len(m._forward_hooks) for model in models for m in model.modules()]


def _snapshot(model: nn.Module) -> tuple[dict, list, list, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], _hooks(model))


def _assert_same(model: nn.Module, snapshot: tuple[dict, list, list, list]) -> None:
    """Bit-identical state, the same train/eval and requires_grad flags, no hook left behind."""
    state, flags, grads, hooks = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert _hooks(model) == hooks


def test_loss_falls_teacher_untouched_modes_restored():
    teacher = _teacher()
    teacher[0].bias.requires_grad_(False)
    teacher[1].eval()  # a mixed-mode teacher: its flags must come back exactly
    student = _student(teacher)
    student.eval()
    before_t, before_s = _snapshot(teacher), _snapshot(student)
    result = distill(student, teacher, _batches(), steps=40, freeze_norm_stats=True, **FAST)
    assert len(result.losses) == result.steps == 40 and result.seconds > 0
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    _assert_same(teacher, before_t)
    assert [m.training for m in student.modules()] == before_s[1]
    assert not torch.equal(student.state_dict()["4.bias"], before_s[0]["4.bias"])
    # freeze_norm_stats: the student's BatchNorm statistics are the teacher's still
    assert torch.equal(student[1].running_mean, teacher[1].running_mean)
    assert _hooks(student) == before_s[3]


def test_norm_stats_update_when_not_frozen():
    teacher = _teacher()
    student = _student(teacher)
    distill(student, teacher, _batches(), steps=2, **FAST)  # the default
    assert not torch.equal(student[1].running_mean, teacher[1].running_mean)


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 0.2)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert 0 < f(9) < f(5) < 1 and f(10) == pytest.approx(0)
    assert warmup_cosine(10, 3)(0) == pytest.approx(1 / 3) and warmup_cosine(10, 0)(0) == 1.0


class _Interrupting:
    """A re-iterable over `items` whose `fail_at`-th batch (counted over all passes) raises."""

    def __init__(self, items: list, fail_at: int) -> None:
        self.items, self.fail_at, self.given = items, fail_at, 0

    def __iter__(self):
        for item in self.items:
            if self.given == self.fail_at:
                raise RuntimeError("interrupted")
            self.given += 1
            yield item


def _loader() -> torch.utils.data.DataLoader:
    """Shuffled, with its own seeded generator: the same order every time it is built."""
    data = torch.utils.data.TensorDataset(torch.cat(_batches(7)))
    return torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("source", [lambda: _batches(7), _loader])
def test_resume_ends_bit_identical(tmp_path, source):
    teacher = _teacher()  # the student keeps its dropout: the RNG state must be resumed too
    evals = []  # eval_fn calls: a resumed run evaluates only after the checkpoint's step

    def evaluate(model: nn.Module) -> dict:
        evals.append(1)
        return {"w": float(model[4].bias.detach().sum())}

    kw = dict(steps=10, accumulate=2, checkpoint_every=3, eval_every=4, eval_fn=evaluate, **FAST)
    straight = _student(teacher)
    fresh = copy.deepcopy(straight)
    a = distill(straight, teacher, source(), checkpoint=tmp_path / "a.pt", **kw)  # 7 batches, 20 needed: restarts

    with pytest.raises(RuntimeError, match="interrupted"):
        distill(copy.deepcopy(fresh), teacher, _Interrupting(source(), fail_at=15), checkpoint=tmp_path / "b.pt", **kw)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 6 and not (tmp_path / "b.pt.tmp").exists()
    resumed, evals = copy.deepcopy(fresh), []  # as in a new process: everything comes from the checkpoint
    b = distill(resumed, teacher, source(), checkpoint=tmp_path / "b.pt", **kw)
    assert len(evals) == 2  # steps 8 and 10: it did resume
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert b.losses == a.losses and b.evals == a.evals and [s for s, _ in a.evals] == [4, 8, 10]
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 10


def test_checkpoint_of_another_student_is_refused(tmp_path):
    teacher = _teacher()
    distill(_student(teacher), teacher, _batches(), steps=2, checkpoint=tmp_path / "c.pt", **FAST)
    other_teacher = _teacher(out=6)
    other = _student(other_teacher)
    before = _snapshot(other)
    with pytest.raises(ValueError, match="different student"):
        distill(other, other_teacher, _batches(), steps=2, checkpoint=tmp_path / "c.pt", **FAST)
    _assert_same(other, before)
    with pytest.raises(ValueError, match="steps=2"):
        distill(_student(teacher), teacher, _batches(), steps=3, checkpoint=tmp_path / "c.pt", **FAST)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.a(x) * self.b(y)


@pytest.mark.parametrize("as_dict", [True, False])
def test_dict_and_tuple_batches(as_dict):
    torch.manual_seed(0)
    teacher = _TwoInputs()
    student = _student(teacher)
    pairs = [(torch.randn(16, 8), torch.randn(16, 6)) for _ in range(4)]
    data = [{"x": x, "y": y} for x, y in pairs] if as_dict else pairs
    result = distill(student, teacher, data, steps=30, **FAST)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


@dataclass
class _Output:
    logits: Tensor


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 10)

    def forward(self, input_ids: Tensor) -> _Output:
        return _Output(logits=self.head(self.body(input_ids)))


def test_hf_style_logits_with_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    kl = DistillLoss("kl", temperature=2.0)(_Output(s), _Output(t))
    p_t, log_p_s = (t / 2).softmax(-1), (s / 2).log_softmax(-1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4
    assert kl == pytest.approx(float(expected), rel=1e-5)
    assert DistillLoss("kl")(_Output(t), _Output(t)) == pytest.approx(0, abs=1e-6)

    teacher = _Classifier()
    student = _student(teacher)
    result = distill(student, teacher, [{"input_ids": x} for x in _batches(4)], steps=30, loss="kl",
                     temperature=2.0, **FAST)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_custom_loss_and_output():
    seen = []

    def loss(s: Tensor, t: Tensor) -> Tensor:
        seen.append((tuple(s.shape), tuple(t.shape), s.requires_grad, t.requires_grad))
        return (s - t).abs().max()

    teacher = _Classifier()
    distill(_student(teacher), teacher, [{"input_ids": x} for x in _batches(2)], steps=2, loss=loss,
            output=lambda out: out.logits[:, :3], **FAST)
    assert seen == [((16, 3), (16, 3), True, False)] * 2


@pytest.mark.parametrize("amp", [True, torch.bfloat16])
def test_amp_on_cpu(amp):
    teacher = _teacher()
    student = _student(teacher)
    result = distill(student, teacher, _batches(), steps=3, amp=amp, **FAST)
    assert all(math.isfinite(x) for x in result.losses)
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_feature_loss_is_mse_over_teacher_variance():
    torch.manual_seed(0)
    teacher = _Classifier()
    student = _student(teacher)
    hooks = _hooks(student, teacher)
    objective = DistillLoss("mse", features={"body": "body"}, feature_weight=0.5)
    x = torch.randn(16, 8)
    with objective.hooks(student, teacher):
        with torch.no_grad():
            t_out = teacher(x)
        s_out = student(x)
        loss = objective(s_out, t_out)
    fs, ft = student.body(x), teacher.body(x)
    mse = nn.functional.mse_loss
    expected = mse(s_out.logits, t_out.logits) + 0.5 * mse(fs, ft) / ft.var(correction=0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert _hooks(student, teacher) == hooks


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs: Tensor) -> _Output:
        return self.inner(**inputs)


@pytest.mark.parametrize("features", [["body", "head"], {"inner.body": "body"},
                                      {"inner.body": "body", "inner.body.1": "body"}])
def test_feature_matching_by_name_and_mapping(features):
    teacher = _Classifier()
    student = _student(teacher)
    if isinstance(features, dict):  # student names differ from the teacher's: wrap it
        student = _Wrapped(student)
    hooks = _hooks(student, teacher)
    result = distill(student, teacher, [{"input_ids": x} for x in _batches(4)], steps=25, features=features,
                     feature_weight=2.0, **FAST)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert _hooks(student, teacher) == hooks


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = _student(teacher)
    other = copy.deepcopy(student)
    small = _batches(8, size=8)
    big = [torch.cat(small[i:i + 4]) for i in (0, 4)]
    a = distill(student, teacher, small, steps=2, accumulate=4, **FAST)
    b = distill(other, teacher, big, steps=2, **FAST)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    for p, q in zip(student.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_eval_fn_steps_and_mode():
    teacher = _teacher()
    student = _student(teacher)
    seen = []

    def evaluate(model: nn.Module) -> float:
        assert not any(m.training for m in model.modules())
        seen.append(model.training)
        return float(len(seen))

    result = distill(student, teacher, _batches(), steps=7, eval_fn=evaluate, eval_every=3, **FAST)
    assert result.evals == [(3, 1.0), (6, 2.0), (7, 3.0)]
    assert all(m.training for m in student.modules())


def test_endless_generator_and_running_out():
    teacher = _teacher()
    taken = []

    def endless():
        while True:
            taken.append(1)
            yield torch.randn(8, 8)

    distill(_student(teacher), teacher, endless(), steps=3, accumulate=2, **FAST)
    assert len(taken) == 6
    with pytest.raises(ValueError, match="ran out after 3 batches"):
        distill(_student(teacher), teacher, (x for x in _batches(3)), steps=5, **FAST)


class _Picky(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


@pytest.mark.parametrize("case, error, match", [
    ("empty", ValueError, "empty"),
    ("steps", ValueError, "need steps >= 1.*got steps=0"),
    ("accumulate", ValueError, "accumulate=0"),
    ("lr", ValueError, "lr=0"),
    ("loss", ValueError, "loss must be one of"),
    ("shapes", ValueError, r"student's output has shape \(16, 5\) but the teacher's has shape \(16, 4\)"),
    ("feature", ValueError, r"\['nope'\] not found in the teacher"),
    ("teacher_rejects", RuntimeError, "the teacher failed on the first batch"),
    ("student_rejects", RuntimeError, "the student failed on the first batch"),
    ("single_tensor", TypeError, "not a single Tensor"),
])
def test_bad_inputs_raise_and_leave_the_student_unchanged(case, error, match):
    teacher, student, data, kw = _Picky(8), _Picky(8), _batches(), dict(steps=2)
    if case == "empty":
        data = []
    elif case in ("steps", "accumulate", "lr"):
        kw[case] = 0
    elif case == "loss":
        kw["loss"] = "huber"
    elif case == "shapes":
        student.lin = nn.Linear(8, 5)
    elif case == "feature":
        kw["features"] = {"lin": "nope"}
    elif case == "teacher_rejects":
        data = _batches(dim=7)
        student.lin = nn.Linear(7, 4)
    elif case == "student_rejects":
        student.lin = nn.Linear(9, 4)
    elif case == "single_tensor":
        data = data[0]
    before, before_t = _snapshot(student), _snapshot(teacher)
    with pytest.raises(error, match=match) as info:
        distill(student, teacher, data, **{"progress": False, **kw})
    _assert_same(student, before)
    _assert_same(teacher, before_t)
    if case.endswith("rejects"):
        assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error, chained


def test_distill_does_not_import_lightning():
    code = ("import sys, kronify.distill; "
            "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.filterwarnings("ignore:Found .* in eval mode")  # the student's frozen BatchNorm
def test_lightning_module_matches_distill_and_leaves_teacher_alone():
    pl = pytest.importorskip("pytorch_lightning")
    from kronify.distill_lightning import DistillModule

    class Recording(DistillModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            losses.append(loss.item())
            return loss

    teacher = _teacher()
    teacher[3].p = 0.0  # no dropout, so that both runs draw no random numbers
    student = _student(teacher)
    student.eval()
    before_t, before_s, reference = _snapshot(teacher), _snapshot(student), copy.deepcopy(student)
    batches, losses = _batches(4), []
    module = Recording(student, teacher, steps=5, lr=1e-2, warmup=1)
    assert not any(k.startswith("teacher") for k in module.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(batches)), batch_size=16)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    _assert_same(teacher, before_t)
    assert [m.training for m in student.modules()] == before_s[1]
    assert not torch.equal(student.state_dict()["4.bias"], before_s[0]["4.bias"])
    assert {id(p) for p in trainer.optimizers[0].param_groups[0]["params"]} == {id(p) for p in student.parameters()}
    # the same objective, optimizer and schedule as distill (which clips by default; Lightning does not here)
    expected = distill(reference, teacher, batches, steps=5, lr=1e-2, warmup=1, max_grad_norm=None, progress=False)
    assert losses == pytest.approx(expected.losses, rel=1e-5)
