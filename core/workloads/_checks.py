"""Argument checks shared by the workload modules.

Every check raises ``ValueError`` naming the owner, the field and the offending value, so
a bad Hydra override points straight at the key to fix.
"""
from __future__ import annotations

import math
import numbers


def check_int(owner: str, name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, rejecting bools, floats and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_float(owner: str, name: str, value: object, *, positive: bool) -> float:
    """Return ``value`` as a finite float that is > 0 (``positive``) or >= 0."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_optional_int(owner: str, name: str, value: object, minimum: int) -> int | None:
    return None if value is None else check_int(owner, name, value, minimum)


def check_optional_float(owner: str, name: str, value: object, *, positive: bool) -> float | None:
    return None if value is None else check_float(owner, name, value, positive=positive)


def check_range(owner: str, name: str, value: object) -> tuple[int, int]:
    """An inclusive ``(lo, hi)`` length range with 1 <= lo <= hi."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{owner}.{name} must be a (lo, hi) pair, got {value!r}")
    lo = check_int(owner, f"{name}[0]", value[0], 1)
    hi = check_int(owner, f"{name}[1]", value[1], 1)
    if hi < lo:
        raise ValueError(f"{owner}.{name} must have lo <= hi, got {value!r}")
    return lo, hi
