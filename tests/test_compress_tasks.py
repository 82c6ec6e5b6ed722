"""Fast checks of the trained-model tasks in benchmarks/compress/tasks.py (no full training)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from benchmarks.compress.tasks import TASKS, Task, random_shift
from kronify.batches import call_model, output_tensor


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as the benchmarks run (faster for these small models on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(TASKS))
def task(request: pytest.FixtureRequest) -> Task:
    return TASKS[request.param]


def test_data_is_sane(task: Task) -> None:
    d = task.data
    assert len(d.x_train) == len(d.y_train) > len(d.x_test) == len(d.y_test) > 0
    assert d.x_train.shape[1:] == d.x_test.shape[1:]
    classes = int(d.y_train.max()) + 1
    assert int(d.y_train.min()) == 0 and torch.equal(d.y_test.unique(), torch.arange(classes))
    assert torch.bincount(d.y_train).min() > 0.5 * len(d.y_train) / classes   # roughly balanced
    assert torch.isfinite(d.x_train.float()).all()


def test_data_and_model_are_deterministic(task: Task) -> None:
    fresh = Task(**{k: getattr(task, k) for k in task.__dataclass_fields__})   # no cached data
    assert torch.equal(fresh.data.x_train, task.data.x_train) and torch.equal(fresh.data.y_test, task.data.y_test)
    torch.manual_seed(0)
    a = task.build().state_dict()
    torch.manual_seed(0)
    b = task.build().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_are_model_inputs(task: Task) -> None:
    model = task.build().eval()
    batches = task.calibration_batches(2, seed=0)
    assert len(batches) == 2
    classes = int(task.data.y_train.max()) + 1
    with torch.no_grad():
        for batch in itertools.chain(batches, itertools.islice(task.unlabelled_batches(1), 2)):
            logits = output_tensor(call_model(model, batch))
            assert logits.shape == (task.batch_size, classes)
    first = task.calibration_batches(1, seed=3)[0]
    again = task.calibration_batches(1, seed=3)[0]
    x, y = (first["input_ids"], again["input_ids"]) if isinstance(first, dict) else (first, again)
    assert torch.equal(x, y)
    assert task.metric(model) >= 0.0


def test_train_lowers_the_loss(task: Task) -> None:
    torch.manual_seed(0)
    model = task.build()
    x, y = task.data.x_train[:128], task.data.y_train[:128]
    with torch.no_grad():   # train mode: BatchNorm uses batch statistics, as the steps did
        before = float(task.loss(model.train(), x, y))
    task.train(model, 12, seed=0, lr=3e-3)   # BERT leaves its ln(4) plateau slowly at 1e-3
    assert not model.training
    with torch.no_grad():
        after = float(task.loss(model.train(), x, y))
    assert after < before


def test_random_shift_moves_content() -> None:
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = random_shift(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and torch.allclose(out.sum((1, 2, 3)), torch.ones(4))
    assert not torch.equal(out, x)
