"""Restricted number types for the `tive:` settings when jsonargparse is not installed.

jsonargparse (the CLI's parser) provides `PositiveInt`, `PositiveFloat` and `restricted_number_type`;
:mod:`lightning_tive.tive_config` uses those when it can import them, so the CLI checks values at
parse time. Python callers on a machine without jsonargparse (e.g. `scripts/gpu_check.py` on a bare
GPU image) get these stand-ins instead: int/float subclasses whose constructor applies the same
rules (no bools, no fractional value for an int type, every comparison must hold).
"""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["PositiveFloat", "PositiveInt", "restricted_number_type"]

_COMPARISONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}


def restricted_number_type(
    name: str, base_type: type, restrictions: tuple | list[tuple], docstring: str | None = None
) -> type:
    """An `int` or `float` subclass named `name` whose values must satisfy every `(op, reference)` pair."""
    if base_type not in (int, float):
        raise ValueError("base_type must be int or float")
    pairs = [restrictions] if isinstance(restrictions, tuple) else list(restrictions)
    for op, _ in pairs:
        if op not in _COMPARISONS:
            raise ValueError(f"unknown comparison {op!r}")
    expression = " and ".join(f"v {op} {ref}" for op, ref in pairs)

    def __new__(cls: type, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{value} is not a number")
        if base_type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not an integer")
        number = base_type(value)
        if not all(_COMPARISONS[op](number, ref) for op, ref in pairs):
            raise ValueError(f"{value} does not conform to {expression}")
        return base_type.__new__(cls, number)

    return type(name, (base_type,), {"__new__": __new__, "__doc__": docstring, "__module__": __name__})


PositiveInt = restricted_number_type("PositiveInt", int, (">", 0), docstring="int restricted to be >0")
PositiveFloat = restricted_number_type("PositiveFloat", float, (">", 0), docstring="float restricted to be >0")
