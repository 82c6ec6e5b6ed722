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


def normalize_overrides(overrides: Mapping[PatternKey, Mapping[str, Any] | None] | None) -> dict[PatternKey, dict | None]:
    """Validate overrides: {name | "re:regex" | module type: dict(n=, terms=, algebra=) or None}."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict, got {type(overrides).__name__}")
    out: dict[PatternKey, dict | None] = {}
    for key, value in overrides.items():
        if isinstance(key, type):
            if not issubclass(key, nn.Module):
                raise TypeError(f"overrides: type key {key.__name__} is not an nn.Module subclass")
        else:
            _check_pattern(key, "overrides")
        if value is None:
            out[key] = None
            continue
        if not isinstance(value, Mapping):
            raise TypeError(f"overrides[{key_repr(key)}] must be a dict or None, got {type(value).__name__}")
        unknown = sorted(set(value) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(
                f"overrides[{key_repr(key)}]: unknown key(s) {unknown}; valid keys are {list(OVERRIDE_KEYS)}"
            )
        out[key] = dict(value)
    return out


class Selector:
    """Decides, per module, whether it is selected and with which settings; remembers which keys matched."""

    def __init__(self, include, exclude, overrides) -> None:
        self.include = normalize_patterns(include, "include")
        self.exclude = normalize_patterns(exclude, "exclude") or []
        self.overrides = normalize_overrides(overrides)
        self.used: set[tuple[str, Any]] = set()

    def select(self, names: list[str], module: nn.Module, defaults: dict) -> tuple[dict | None, str]:
        """Return (settings, "") for a selected module, or (None, reason) for one the user left out.

        All keys are tested (not only the first hit) so that unused-pattern warnings are exact.
        Exclude wins over include; an override of None skips; matching override dicts are applied
        in order: type keys first, then name keys, each in the order given (later ones win).
        """
        included = True
        if self.include is not None:
            hits = [p for p in self.include if key_matches(names, module, p)]
            self.used.update(("include", p) for p in hits)
            included = bool(hits)
        excl = [p for p in self.exclude if key_matches(names, module, p)]
        self.used.update(("exclude", p) for p in excl)
        matching = [k for k in self.overrides if key_matches(names, module, k)]
        self.used.update(("overrides", k) for k in matching)
        if excl:
            return None, f"excluded by {excl[0]!r}"
        if not included:
            return None, "not matched by include"
        settings = dict(defaults)
        ordered = [k for k in matching if isinstance(k, type)] + [k for k in matching if not isinstance(k, type)]
        for k in ordered:
            if self.overrides[k] is None:
                return None, f"override {key_repr(k)} is None"
            settings.update(self.overrides[k])
        return settings, ""

    def unused(self) -> list[str]:
        """Descriptions of patterns and override keys that matched no module."""
        out = []
        for p in self.include or []:
            if ("include", p) not in self.used:
                out.append(f"include pattern {p!r}")
        for p in self.exclude:
            if ("exclude", p) not in self.used:
                out.append(f"exclude pattern {p!r}")
        for k in self.overrides:
            if ("overrides", k) not in self.used:
                out.append(f"overrides key {key_repr(k)}")
        return out
