"""Declared config keys: type, range, choices and meaning written once, on the dataclass.

Every configuration section (core or a method's) is a plain dataclass whose fields are
declared with :func:`key`::

    @dataclass
    class TrainConfig:
        lr: float = key(0.1, "client learning rate", gt=0, le=1e3, flag="--lr")

The same declaration serves three readers, so they cannot drift apart:

- :func:`validate_section` checks every value (finite, in range, one of the choices) and
  raises a one-line :class:`~fedprune.errors.ConfigError` naming the key and the range;
- :func:`key_rows` feeds the README's table of keys (``tools/config_table.py``);
- a plugin method's own section (``fedprune.registry``) is validated the same way.

Why dataclass metadata rather than pydantic: the configuration is already a tree of
dataclasses that checkpoints, TOML and Flower's run config serialise as plain dicts;
metadata adds the ranges without a second model layer, keeps messages in one house style
("KEY must be in [a, b], got v"), and keeps the config importable without the Flower
extra (pydantic is only installed with it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fedprune.errors import ConfigError, elide

T = TypeVar("T")

MAX_INT64 = 2**63 - 1


@dataclass(frozen=True)
class Spec:
    """What a key accepts and what it means."""

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None

    def range_text(self) -> str:
        """``[0, 1)``-style interval text ('' when the key has no numeric bounds)."""
        if self.ge is None and self.gt is None and self.le is None and self.lt is None:
            return ""
        lo = "(" + _num(self.gt) if self.gt is not None else "[" + _num(self.ge)
        hi = _num(self.lt) + ")" if self.lt is not None else _num(self.le) + "]"
        return f"{lo}, {hi}"

    def admits(self, v: float) -> bool:
        """Whether a finite number lies in the declared interval."""
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )


def _num(v: float | None) -> str:
    if v is None:  # pragma: no cover - range_text guards
        return "?"
    if isinstance(v, float) and abs(v) >= 1e6:
        return f"{v:g}"
    if float(v).is_integer() and abs(v) >= 1e6:
        iv = int(v)
        return "2**63-1" if iv == MAX_INT64 else f"{iv:,}".replace(",", "_")
    if float(v).is_integer():
        return str(int(v))
    return repr(v)


def key(
    default: T,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[str] | None = None,
    flag: str | None = None,
) -> T:
    """A dataclass field with its :class:`Spec` (see the module docstring)."""
    spec = Spec(doc, ge, gt, le, lt, tuple(choices) if choices is not None else None, flag)
    out: T = field(default=default, metadata={"spec": spec})
    return out


def spec_of(f: dataclasses.Field[Any]) -> Spec | None:
    """The :class:`Spec` of a field declared with :func:`key`, else None."""
    spec = f.metadata.get("spec")
    return spec if isinstance(spec, Spec) else None


def check_value(path: str, value: Any, spec: Spec) -> None:
    """Raise a ConfigError naming ``path`` unless ``value`` fits ``spec``."""
    if spec.choices is not None:
        if value not in spec.choices:
            close = difflib.get_close_matches(str(value), spec.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{path}: unknown value {elide(repr(value), 40)}{hint}; "
                f"choose from {', '.join(spec.choices)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    rng = spec.range_text()
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} must be a finite number in {rng or 'range'}, got {value}")
    if rng and not spec.admits(value):
        raise ConfigError(f"{path} must be in {rng}, got {elide(str(value), 40)}")


def validate_section(obj: Any, prefix: str) -> None:
    """Check every declared field of a section dataclass (recursively)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate_section(value, f"{prefix}{f.name}.")
            continue
        spec = spec_of(f)
        if spec is not None:
            check_value(f"{prefix}{f.name}", value, spec)


@dataclass(frozen=True)
class KeyRow:
    """One row of the table of keys."""

    key: str
    type: str
    default: Any
    spec: Spec | None


def key_rows(cls: type, prefix: str = "") -> Iterator[KeyRow]:
    """Every leaf key of a section dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from key_rows(t, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # pragma: no cover - every key has a default
            default = None
        yield KeyRow(f"{prefix}{f.name}", getattr(t, "__name__", str(t)), default, spec_of(f))


def undeclared(cls: type, prefix: str = "") -> list[str]:
    """Leaf keys of ``cls`` declared without :func:`key` (a test keeps this empty)."""
    return [r.key for r in key_rows(cls, prefix) if r.spec is None]
