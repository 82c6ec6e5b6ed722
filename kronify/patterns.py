"""Selecting modules by name for `kronify.convert`: include / exclude lists and per-layer overrides.

A *pattern* is either a module name, matching the exact name or any dotted suffix of it
(``"fc"`` matches ``"fc"`` and ``"head.fc"`` but not ``"head.myfc"``), or ``"re:<regex>"``,
matched with ``re.fullmatch`` against the full dotted name. An override key may also be a module
type, matching instances of that type (subclasses included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Union

from torch import nn

OVERRIDE_KEYS = ("n", "terms", "algebra")
PatternKey = Union[str, type]


def _check_pattern(p: Any, what: str) -> str:
    if not isinstance(p, str) or not p:
        raise TypeError(f"{what}: patterns must be non-empty strings, got {p!r}")
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            raise ValueError(f"{what}: invalid regex {p!r}: {e}") from None
    return p


def normalize_patterns(patterns: str | Iterable[str] | None, what: str) -> list[str] | None:
    """Validate include/exclude: None, one pattern, or an iterable of patterns."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        items = list(patterns)
    except TypeError:
        raise TypeError(f"{what} must be a string or a list of strings, got {type(patterns).__name__}") from None
    return [_check_pattern(p, what) for p in items]


def name_matches(name: str, pattern: str) -> bool:
    """True when `pattern` (plain name / dotted suffix, or "re:regex") matches module name `name`."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def key_matches(names: Iterable[str], module: nn.Module, key: PatternKey) -> bool:
    """Match an include/exclude/override key against a module reachable under any of `names`."""
    if isinstance(key, type):
        return isinstance(module, key)
    return any(name_matches(nm, key) for nm in names)


def key_repr(key: PatternKey) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


def normalize_overrides(overrides: Mapping[PatternKey, Mapping[str, Any] | None] | None
                        ) -> dict[PatternKey, dict | None]:
    """Validate overrides: {name | "re:regex" | module type: dict(n=, terms=, algebra=) or None}."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict, got {type(overrides).__name__}")
    out: dict[PatternKey, dict | None] = {}
    for key, value in overrides.items():
        if isinstance(key, type) and not issubclass(key, nn.Module):
            raise TypeError(f"overrides: type key {key.__name__} is not an nn.Module subclass")
        if not isinstance(key, type):
            _check_pattern(key, "overrides")
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"overrides[{key_repr(key)}] must be a dict or None, got {type(value).__name__}")
        unknown = sorted(set(value or ()) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(f"overrides[{key_repr(key)}]: unknown key(s) {unknown}; "
                             f"valid keys are {list(OVERRIDE_KEYS)}")
        out[key] = None if value is None else dict(value)
    return out
