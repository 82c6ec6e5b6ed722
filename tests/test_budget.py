"""convert(model, budget=b): n, terms or dense chosen per layer so that the model keeps a share b of its
parameters with the smallest total error (kronify.budget, kronify.budget_plan).

Reachable parameter counts are enumerated independently here (every n dividing both weight dims, n ≥ 2,
n ≤ 16, n⁴ ≤ the weight's size, 1..n² terms, cheaper than dense), and `allocate` is checked against brute force.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kronify
from kronify import KronConfig, kron_param_count
from kronify.budget import LayerOptions, allocate
from kronify.convert import is_kron
from kronify.report import count_params

CHANNELS = [8, 12, 16, 24, 32, 48, 64]


# ---- models --------------------------------------------------------------------------------------------------
class Stack(nn.Module):
    """Conv2d layers (3x3 or 1x1, 'same' padding), global average pooling, then Linear layers."""

    def __init__(self, widths: list[int], convs: int, kernels: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], kernels[i], padding="same")
                                   for i in range(convs))
        self.linears = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(convs, len(widths) - 1))

    def forward(self, x):  # x: (B, widths[0], H, W) with convs, (B, widths[0]) without
        for conv in self.convs:
            x = torch.relu(conv(x))
        if self.convs:
            x = x.mean((2, 3))
        for i, linear in enumerate(self.linears):
            x = linear(x) if i == len(self.linears) - 1 else torch.relu(linear(x))
        return x

    def example(self, batch: int = 4, g: torch.Generator | None = None) -> torch.Tensor:
        cin = (self.convs[0].in_channels if self.convs else self.linears[0].in_features)
        return torch.randn(batch, cin, 6, 6, generator=g) if self.convs else torch.randn(batch, cin, generator=g)


def stack(seed: int, layers: int | None = None) -> Stack:
    """A random Stack of 4..10 layers (or `layers`), with weights from torch seed `seed`."""
    rng = random.Random(seed)
    layers = layers or rng.randint(4, 10)
    convs = rng.randint(0, layers)
    widths = [rng.choice(CHANNELS) for _ in range(layers + 1)]
    torch.manual_seed(seed)
    return Stack(widths, convs, [rng.choice([1, 3]) for _ in range(convs)]).eval()


FIXED = [32, 48, 64, 24, 48, 32, 64, 16]  # a 7-layer stack (3 convs) where the allocation lands within 1 %


def fixed_stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack(FIXED, 3, [3, 1, 3]).eval()


def _seeded_stack(widths: list[int], convs: int, kernels: list[int], seed: int) -> Stack:
    torch.manual_seed(seed)
    return Stack(widths, min(convs, len(widths) - 1), kernels).eval()


stacks = st.builds(
    _seeded_stack,
    st.integers(4, 10).flatmap(lambda L: st.lists(st.sampled_from(CHANNELS), min_size=L + 1, max_size=L + 1)),
    st.integers(0, 10),
    st.lists(st.sampled_from([1, 3]), min_size=10, max_size=10),
    st.integers(0, 2 ** 16),
)


# ---- independent enumeration of what a budget can reach ---------------------------------------------------------
def reachable_costs(shape: tuple[int, ...]) -> list[int]:
    """Parameter counts of every option of one weight: dense and each (n, terms) cheaper than dense."""
    numel = math.prod(shape)
    out = [numel]
    for n in range(2, 17):
        if shape[0] % n or shape[1] % n or n ** 4 > numel:
            continue
        out += [c for r in range(1, n * n + 1) if (c := kron_param_count(shape, n, r)) < numel]
    return out


def weights_of(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def reachable_range(model: nn.Module) -> tuple[int, int]:
    total = count_params(model)
    fixed = total - sum(math.prod(s) for s in weights_of(model))
    return fixed + sum(min(reachable_costs(s)) for s in weights_of(model)), total


def best_reachable(model: nn.Module, target: int) -> int:
    """The largest parameter count ≤ target that any combination of per-layer options gives (subset sums)."""
    total = count_params(model)
    sums = {total - sum(math.prod(s) for s in weights_of(model))}
    for shape in weights_of(model):
        sums = {x + c for x in sums for c in reachable_costs(shape) if x + c <= target}
    return max(sums)


def convert_quietly(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = kronify.convert(model, warm_start=True, **kwargs)
    return report, [str(w.message) for w in caught]


def check_choices(report) -> None:
    """Every converted row has a valid (n, terms), its layer is parametrized that way, and its count adds up."""
    modules = dict(report.model.named_modules())
    for r in report.rows:
        layer = modules[r.name]
        if r.status != "converted":
            assert not is_kron(layer) and r.params_after == r.params_before
            continue
        assert r.shape[0] % r.n == 0 and r.shape[1] % r.n == 0, r
        assert 1 <= r.terms <= r.n ** 2 and r.n ** 4 <= math.prod(r.shape)
        p = layer.parametrizations.weight[0]
        assert (p.n, p.terms, p.algebra) == (r.n, r.terms, "learned")
        assert r.params_after == kron_param_count(r.shape, r.n, r.terms) + layer.bias.numel() < r.params_before
    assert report.params_after == count_params(report.model)


# ---- convert(budget=...) on generated models ----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(model=stacks, budget=st.floats(0.3, 0.9))
def test_budget_choices_are_valid_and_never_exceed_the_target(model, budget):
    total = count_params(model)
    target = round(budget * total)
    low, _ = reachable_range(model)
    try:
        report, warned = convert_quietly(model, budget=budget, inplace=False)
    except ValueError as e:
        assert target < 0.99 * low  # only a budget below what the options reach fails
        assert f"({low / total:.3f})" in str(e)
        return
    assert target >= 0.99 * low
    check_choices(report)
    assert report.budget == budget and report.config.budget is None
    assert report.params_after <= 1.01 * target
    within = math.isclose(report.params_after, target, rel_tol=0.01)
    assert within == (not [w for w in warned if w.startswith("budget:")]), warned  # a miss is always reported
    assert f"budget: {budget:.3f} of the parameters requested" in str(report)
    for r in report.rows:
        if r.status != "converted":
            assert r.reason == f"kept dense by the budget ({budget})"


def test_budget_lands_within_one_percent_whenever_the_options_allow_it():
    misses = []
    for seed in range(40):
        model = stack(seed)
        if len(weights_of(model)) < 6:
            continue
        budget = random.Random(1000 + seed).uniform(0.3, 0.9)
        target = round(budget * count_params(model))
        if best_reachable(model, target) < 0.995 * target:
            continue  # the options cannot land near this target
        report, _ = convert_quietly(model, budget=budget, inplace=False)
        if not math.isclose(report.params_after, target, rel_tol=0.01):
            misses.append((seed, round(budget, 3), report.params_after / target))
    assert not misses


def test_budget_on_a_fixed_stack_lands_within_one_percent_and_round_trips(tmp_path):
    model = fixed_stack()
    x = model.example(g=torch.Generator().manual_seed(0))
    for budget in (0.35, 0.5, 0.7):
        report, warned = convert_quietly(model, budget=budget, inplace=False)
        assert not warned
        assert abs(report.params_after - budget * report.params_before) <= 0.01 * budget * report.params_before
        check_choices(report)
        # the choice is ordinary per-layer config: a fresh dense copy converted with it ends up the same
        again = kronify.convert(copy.deepcopy(model), report.config)
        assert [(r.name, r.status, r.n, r.terms, r.params_after) for r in again.rows] == \
               [(r.name, r.status, r.n, r.terms, r.params_after) for r in report.rows]
        assert again.params_after == report.params_after
        with torch.no_grad():
            torch.testing.assert_close(again.model(x), report.model(x), rtol=0, atol=0)
        again_cfg = KronConfig.from_json(report.config.to_json())
        assert again_cfg == report.config
    # save / load
    path = tmp_path / "budget.safetensors"
    kronify.save(report.model, path, config=report.config)
    loaded = kronify.load(fixed_stack(seed=1), path)
    assert count_params(loaded) == report.params_after
    with torch.no_grad():
        assert torch.equal(loaded(x), report.model(x))


def test_budget_one_keeps_everything_dense():
    model = fixed_stack()
    snap = copy.deepcopy(model.state_dict())
    report, warned = convert_quietly(model, budget=1.0, inplace=False)
    assert not warned and report.converted == [] and report.ratio == 1.0
    assert all(r.reason == "kept dense by the budget (1.0)" for r in report.rows)
    assert not any(is_kron(m) for m in report.model.modules())
    assert all(torch.equal(v, snap[k]) for k, v in report.model.state_dict().items())


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, True, float("nan")])
def test_budget_outside_zero_one_is_rejected(budget):
    model = fixed_stack()
    snap = copy.deepcopy(model.state_dict())
    message = f"budget must be a share of the parameters in (0, 1], got {budget!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        kronify.convert(model, budget=budget, warm_start=True)
    assert not any(is_kron(m) for m in model.modules())
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_budget_below_the_smallest_reachable_size_names_the_reachable_range():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    low, total = reachable_range(model)
    assert (low, total) == (2 * (2 * 2 + 8 * 8 // 4) + 16, 144)  # n=2, 1 term: A 2x2 and F 4x4, plus biases
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot be reached") as e:
        kronify.convert(model, budget=0.2, warm_start=True)
    message = str(e.value)
    assert f"{low:,} ({low / total:.3f})" in message and f"{total:,} (1.0)" in message
    assert not any(is_kron(m) for m in model.modules())
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    # just reachable: the smallest option everywhere
    report, _ = convert_quietly(model, budget=low / total, inplace=False)
    assert report.params_after == low and all((r.n, r.terms) == (2, 1) for r in report.rows if r.n)


def test_excluded_layers_stay_dense_and_count_toward_the_total():
    model = fixed_stack()
    budget = 0.5
    free, _ = convert_quietly(model, budget=budget, inplace=False)
    report, warned = convert_quietly(model, budget=budget, exclude=["convs.2"], inplace=False)
    assert not warned
    excluded = next(r for r in report.rows if r.name == "convs.2")
    assert excluded.status == "skipped" and excluded.reason.startswith("excluded by")
    assert not is_kron(report.model.convs[2])
    assert abs(report.params_after - budget * report.params_before) <= 0.01 * budget * report.params_before
    # the other layers give up what the dense excluded layer keeps
    others = lambda rep: sum(r.params_after for r in rep.rows if r.name != "convs.2")  # noqa: E731
    assert others(report) <= others(free) - (excluded.params_before - next(
        r for r in free.rows if r.name == "convs.2").params_after) * 0.9


def test_overrides_with_a_budget():
    model = fixed_stack()
    with pytest.raises(ValueError, match="overrides may only keep layers dense"):
        kronify.convert(model, budget=0.5, warm_start=True, overrides={"linears.0": {"n": 4}})
    assert not any(is_kron(m) for m in model.modules())
    report, warned = convert_quietly(model, budget=0.5, overrides={"convs.0": None}, inplace=False)
    row = next(r for r in report.rows if r.name == "convs.0")
    assert row.status == "skipped" and not is_kron(report.model.convs[0])
    assert abs(report.params_after - 0.5 * report.params_before) <= 0.01 * 0.5 * report.params_before


def test_budget_with_calibration_batches():
    model = fixed_stack()
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, model.convs[0].in_channels, generator=g)
    batches = [torch.einsum("brhw,rc->bchw", torch.randn(4, 3, 6, 6, generator=g), mix) for _ in range(4)]
    report, warned = convert_quietly(model, budget=0.5, calibration=batches, inplace=False)
    assert not warned
    assert abs(report.params_after - 0.5 * report.params_before) <= 0.01 * 0.5 * report.params_before
    check_choices(report)
    assert all(r.fit and not r.fit.startswith("weight-only") for r in report.rows if r.status == "converted")
    assert all(r.output_error <= r.weight_fit_error + 1e-9 for r in report.rows if r.status == "converted")
    plain, _ = convert_quietly(model, budget=0.5, inplace=False)
    # the whitened spectra of these low-rank inputs choose differently from the weight spectra
    assert [(r.n, r.terms) for r in report.rows] != [(r.n, r.terms) for r in plain.rows]


def test_budget_with_calibration_from_a_one_shot_iterator():
    model = fixed_stack()
    g = torch.Generator().manual_seed(0)
    batches = [model.example(g=g) for _ in range(4)]
    report, _ = convert_quietly(model, budget=0.5, calibration=(b for b in batches), inplace=False)
    assert report.converted


# ---- allocate ------------------------------------------------------------------------------------------------------
def total(layers: list[LayerOptions], choice: dict, fixed: int) -> tuple[int, float]:
    picked = [next(o for o in layer.options if o[2:] == choice[layer.name]) for layer in layers]
    return fixed + sum(o[0] for o in picked), sum(o[1] for o in picked)


def brute_force(layers: list[LayerOptions], budget: int, fixed: int) -> float:
    """Smallest total error over all combinations of options within `budget` (inf when none fits)."""
    best = math.inf
    for combo in itertools.product(*(layer.options for layer in layers)):
        if fixed + sum(o[0] for o in combo) <= budget:
            best = min(best, sum(o[1] for o in combo))
    return best


def brute_force_near(layers: list[LayerOptions], budget: int, fixed: int) -> float:
    """Smallest total error over the combinations that land within 1 % below `budget` (inf when none does)."""
    best = math.inf
    for combo in itertools.product(*(layer.options for layer in layers)):
        if 0.99 * budget <= fixed + sum(o[0] for o in combo) <= budget:
            best = min(best, sum(o[1] for o in combo))
    return best


def check_allocation(layers: list[LayerOptions], budget: int, fixed: int) -> None:
    """The contract: never above the budget; within 1 % below it whenever some combination is, and then the
    least error among those; otherwise the least error among all combinations that fit."""
    cost, err = total(layers, allocate(layers, budget, fixed), fixed)
    assert cost <= budget
    near = brute_force_near(layers, budget, fixed)
    if near < math.inf:
        assert cost >= 0.99 * budget and err == pytest.approx(near), budget
    else:
        assert err == pytest.approx(brute_force(layers, budget, fixed)), budget


def test_allocate_matches_brute_force_on_a_hand_built_example():
    layers = [
        LayerOptions("a", [(100, 0.0, None, None), (20, 0.5, 2, 1), (40, 0.2, 2, 2), (60, 0.15, 2, 3)]),
        LayerOptions("b", [(80, 0.0, None, None), (10, 0.9, 4, 1), (30, 0.3, 2, 1), (50, 0.25, 2, 2)]),
        LayerOptions("c", [(60, 0.0, None, None), (15, 0.4, 2, 1), (25, 0.35, 2, 2), (30, 0.38, 2, 3)]),
    ]
    fixed = 7
    low = fixed + 20 + 10 + 15
    for budget in range(low, fixed + 241):
        check_allocation(layers, budget, fixed)
    assert allocate(layers, low, fixed) == {"a": (2, 1), "b": (4, 1), "c": (2, 1)}
    assert allocate(layers, fixed + 240, fixed) == {"a": (None, None), "b": (None, None), "c": (None, None)}
    # 10 parameters above the cheapest combination buy c's second option (the slack, exactly spent)
    assert allocate(layers, low + 10, fixed)["c"] == (2, 2)


def test_allocate_rejects_unreachable_targets():
    layers = [LayerOptions("a", [(100, 0.0, None, None), (20, 0.5, 2, 1)])]
    with pytest.raises(ValueError, match=r"between 25 \(0.238\) and 105 \(1.0\)"):
        allocate(layers, 20, 5)
    with pytest.raises(ValueError, match="cannot be reached"):
        allocate(layers, 120, 5)
    assert allocate(layers, 25, 5) == {"a": (2, 1)}


option_lists = st.lists(
    st.tuples(st.integers(1, 99), st.floats(0.01, 1.0)), min_size=1, max_size=5
).map(lambda opts: [(100, 0.0, None, None)] + [(c, e, 2, i + 1) for i, (c, e) in enumerate(opts)])


@settings(max_examples=60, deadline=None)
@given(options=st.lists(option_lists, min_size=1, max_size=4), fixed=st.integers(0, 50), share=st.floats(0, 1))
def test_allocate_lands_near_the_budget_with_the_least_error(options, fixed, share):
    layers = [LayerOptions(f"l{i}", opts) for i, opts in enumerate(options)]
    low = fixed + sum(min(o[0] for o in layer.options) for layer in layers)
    high = fixed + 100 * len(layers)
    budget = round(low + share * (high - low))
    assert set(allocate(layers, budget, fixed)) == {layer.name for layer in layers}
    check_allocation(layers, budget, fixed)
