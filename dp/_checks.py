"""Argument checks shared by the dp/ modules; every failure is an AccountingError."""

from __future__ import annotations

import math
import numbers

from floor.errors import AccountingError

__all__ = ["check_delta", "check_int", "check_positive", "check_probability"]


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AccountingError(f"{name} must be a real number, got {type(value).__name__}")
    result = float(value)
    if math.isnan(result):
        raise AccountingError(f"{name} must not be NaN")
    return result


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a finite float > 0 (or >= 0 with ``allow_zero``)."""
    result = _as_float(name, value)
    if not math.isfinite(result):
        raise AccountingError(f"{name} must be finite, got {result}")
    if result < 0 or (result == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise AccountingError(f"{name} must be {bound}, got {result}")
    return result


def check_delta(value: object, name: str = "delta") -> float:
    """Return ``value`` as a float strictly inside (0, 1)."""
    result = _as_float(name, value)
    if not 0.0 < result < 1.0:
        raise AccountingError(f"{name} must be in the open interval (0, 1), got {result}")
    return result


def check_probability(name: str, value: object) -> float:
    """Return ``value`` as a float in (0, 1] (a sampling rate of zero releases nothing)."""
    result = _as_float(name, value)
    if not 0.0 < result <= 1.0:
        raise AccountingError(f"{name} must be in (0, 1], got {result}")
    return result


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AccountingError(f"{name} must be an integer, got {type(value).__name__}")
    result = int(value)
    if result < minimum:
        raise AccountingError(f"{name} must be >= {minimum}, got {result}")
    return result
