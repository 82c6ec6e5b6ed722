"""KronConfig (JSON round trip, validation, use by convert) and the core's import graph (no cycle)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kronify
from kronify import KronConfig


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def test_config_round_trips_through_json_with_type_keys():
    cfg = KronConfig(n=2, terms=3, warm_start=True, include=["re:.*"], exclude="4",
                     overrides={nn.Conv2d: {"n": 4, "terms": 2}, "2": {"algebra": "complex", "terms": 2}, "re:x.*": None},
                     strict=True)
    text = cfg.to_json()
    d = json.loads(text)
    assert d["overrides"]["type:torch.nn.modules.conv.Conv2d"] == {"n": 4, "terms": 2}
    assert d["exclude"] == ["4"]
    again = KronConfig.from_json(text)
    assert again == cfg and nn.Conv2d in again.overrides


@pytest.mark.parametrize("d, match", [
    ({"n": 1}, "n must be an integer >= 2"),
    ({"n": 2, "terms": 5}, r"terms must be an integer in 1..n²=4"),
    ({"overrides": {"fc": {"n": 3, "terms": 10}}}, r"overrides\['fc'\]: terms must be"),
    ({"overrides": {"type:torch.nn.NoSuchLayer": None}}, "cannot import the module type"),
    ({"overrides": {"type:torch.zeros": None}}, "does not name an nn.Module subclass"),
    ({"rank": 2}, r"unknown field\(s\) \['rank'\]"),
])
def test_bad_configs_name_the_offending_field(d, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KronConfig.from_dict(d)


def test_convert_takes_a_config_positionally_or_by_keyword_and_records_it():
    cfg = KronConfig(n=2, terms=1, overrides={"4": None})
    for call in (lambda m: kronify.convert(m, cfg), lambda m: kronify.convert(m, config=cfg)):
        model = net()
        report = call(model)
        assert report.config == cfg and report.converted == ["0", "2"] and "4" in report.skipped
        assert all(r.terms == 1 for r in report.rows if r.status == "converted")
    assert kronify.convert(net(), 2, terms=1).config == KronConfig(n=2, terms=1)


def test_config_and_conflicting_keywords_raise_and_leave_the_model_alone():
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"set \['terms'\] in the config"):
        kronify.convert(model, KronConfig(), terms=2)
    with pytest.raises(TypeError, match="not twice"):
        kronify.convert(model, KronConfig(), config=KronConfig())
    assert model.state_dict().keys() == state.keys() and not any(kronify.is_kron(m) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_core_imports_have_no_cycle_and_never_reach_mri():
    """Static import graph of kronify/*.py: acyclic (convert -> report -> merge, not back), no kronify.mri."""
    root = Path(kronify.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kronify"):
                deps.add(node.module.split(".")[1] if "." in node.module else "__init__")
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kronify.")}
        graph[name] = deps - {name}
    assert not any("mri" in deps for deps in graph.values())
    assert "convert" not in graph["report"] and "convert" not in graph["merge"] and "report" in graph["convert"]

    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack + [node, dep])}"
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for module in graph:
        if module != "__init__" and module not in state:
            visit(module, [])
