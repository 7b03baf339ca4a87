"""Range checks for config dataclasses, declared beside each field:

    batch_size: int = field(default=16, metadata=at_least(1))

`check_fields(obj)` (called from `__post_init__`) raises `ConfigError` naming the field, its value and
what is allowed. Floats must be finite everywhere, so `nan` and `inf` never slip through a bound.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from scratchlm.errors import ScratchLMError


class ConfigError(ScratchLMError):
    """A config value out of range; `fields` are the names involved (the TOML loader adds the source)."""

    def __init__(self, fields: str | tuple[str, ...], message: str) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.message = message
        super().__init__(f"{self.fields[0]}: {message}")

    def prefixed(self, prefix: str) -> ConfigError:
        return ConfigError(tuple(prefix + f for f in self.fields), self.message)


def _bound(low: float | None, high: float | None, low_open: bool, high_open: bool) -> dict:
    return {"range": (low, high, low_open, high_open)}


def at_least(low: float) -> dict:
    return _bound(low, None, False, False)


def above(low: float) -> dict:
    return _bound(low, None, True, False)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> dict:
    return _bound(low, high, low_open, high_open)


def describe_range(kind: str, low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def in_range(value: float, low, high, low_open: bool, high_open: bool) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    above_low = low is None or (value > low if low_open else value >= low)
    below_high = high is None or (value < high if high_open else value <= high)
    return above_low and below_high


def check_value(name: str, value: Any, bounds: tuple) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if not in_range(v, *bounds):
            kind = "an integer" if isinstance(v, int) else "a finite number"
            raise ConfigError(name, f"expected {describe_range(kind, *bounds)}, got {value!r}")


def check_fields(obj: Any) -> None:
    """Check every field of dataclass `obj` that declares a range (None passes: "use the default")."""
    for f in dataclasses.fields(obj):
        if "range" in f.metadata:
            check_value(f.name, getattr(obj, f.name), f.metadata["range"])
