"""The package layout's rules: recipes -> zoo -> kronify.mri -> kronify, and no file in kronify/mri over ~350 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (at any depth, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("kronify/mri"), ids=lambda p: str(p.relative_to(REPO)))
def test_kronify_mri_imports_neither_zoo_nor_recipes(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("zoo", "_common", "recipes", "table1")}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", [p for p in files("kronify") if "mri" not in p.relative_to(REPO).parts],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_package_does_not_import_kronify_mri(path):
    bad = {m for m in imported_modules(path) if m.startswith("kronify.mri") or m.split(".")[0] == "zoo"}
    assert not bad, f"{path} imports {bad}"


def test_zoo_imports_no_recipe():
    for path in files("zoo"):
        assert not {m for m in imported_modules(path) if m.split(".")[0] in ("_common", "recipes")}, path


def test_no_file_in_kronify_mri_is_over_350_lines():
    long = {str(p.relative_to(REPO)): n for p in files("kronify/mri") if (n := len(p.read_text().splitlines())) > 350}
    assert not long
