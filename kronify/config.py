"""KronConfig: every setting of a conversion in one dataclass that round-trips through JSON (like PEFT's configs).

Override keys are module names, "re:<regex>" patterns or module types; in JSON a type is written as
"type:<module>.<qualname>" (e.g. "type:torch.nn.modules.linear.Linear") and imported back by `from_dict`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from kronify.algebra import LEARNED, resolve_algebra
from kronify.calibration.config import CalibrationConfig
from kronify.patterns import normalize_overrides, normalize_patterns

__all__ = ["CONFIG_ATTRIBUTE", "KronConfig"]

#: The attribute of a converted (or loaded) model that holds its KronConfig (kronify.save's default config).
CONFIG_ATTRIBUTE = "kronify_config"

_TYPE_PREFIX = "type:"


def _type_to_str(key: Any) -> Any:
    return f"{_TYPE_PREFIX}{key.__module__}.{key.__qualname__}" if isinstance(key, type) else key


def _str_to_type(key: str) -> Any:
    if not key.startswith(_TYPE_PREFIX):
        return key
    module_name, _, qualname = key[len(_TYPE_PREFIX):].rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"KronConfig: cannot import the module type of override key {key!r}: {e}") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"KronConfig: override key {key!r} does not name an nn.Module subclass")
    return obj


@dataclass
class KronConfig:
    """Settings of `kronify.convert`.

    n: Kronecker factor size (layers keep about 1/n of their weights); terms: Kronecker terms per weight
    (1..n², default n); algebra: "learned", "complex" (n=2) or "quaternion" (n=4, A fixed);
    warm_start: factors of the nearest Kronecker sum to each current weight (else a cold start with the
    weight's own standard deviation); include / exclude: module-name patterns; overrides: {name | "re:regex" |
    module type: dict(n=, terms=, algebra=) or None}; strict: fail if a selected layer cannot be converted;
    budget: share of the model's parameters to keep, with n / terms / dense chosen per layer (the choices are
    written into `overrides` of the config the report carries, so load needs no budget run); calibration:
    how factors are fitted when `convert` is given calibration batches (None: CalibrationConfig());
    embeddings: also convert nn.Embedding weights (num_embeddings x dim, as KroneckerBERT does) together with
    an output head tied to them, which then shares their factors (None: only under a budget).
    """

    n: int = 2
    terms: int | None = None
    algebra: str = LEARNED
    warm_start: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    overrides: dict[Any, dict[str, Any] | None] = field(default_factory=dict)
    strict: bool = False
    budget: float | None = None
    calibration: CalibrationConfig | None = None
    embeddings: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
        if self.calibration is not None and not isinstance(self.calibration, CalibrationConfig):
            raise TypeError("KronConfig: calibration must be a CalibrationConfig, got "
                            f"{type(self.calibration).__name__}")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1):
            raise ValueError(f"budget must be a share of the parameters in (0, 1], got {b!r}")
        resolve_algebra(self.algebra, self.n, self.terms)
        self.include = normalize_patterns(self.include, "include")
        self.exclude = normalize_patterns(self.exclude, "exclude")
        self.overrides = normalize_overrides(self.overrides)
        for key, value in self.overrides.items():
            if value is not None:
                settings = {"n": self.n, "terms": self.terms, "algebra": self.algebra, **value}
                try:
                    resolve_algebra(settings["algebra"], settings["n"], settings["terms"])
                except ValueError as e:
                    raise ValueError(f"overrides[{_type_to_str(key)!r}]: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; type override keys become "type:<module>.<qualname>"."""
        d = asdict(self)
        d["overrides"] = {_type_to_str(k): v for k, v in self.overrides.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KronConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"KronConfig: unknown field(s) {unknown}")
        d = dict(d)
        d["overrides"] = {_str_to_type(k): v for k, v in (d.get("overrides") or {}).items()}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KronConfig:
        return cls.from_dict(json.loads(text))
