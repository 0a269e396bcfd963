"""Argument checks shared by every public constructor and method.

Each raises ``TypeError`` (wrong kind) or ``ValueError`` (right kind, bad value) with a message
that names the argument and the value, before anything has changed.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal


def positive_int(name: str, value: object) -> int:
    """``value`` as a positive int; ``bool`` is refused although it is an ``int``."""
    if type(value) is int and value > 0:
        return value  # the common case, without the slow ABC check below
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def positive_seconds(name: str, value: object, maximum: float = math.inf) -> float:
    """``value`` as a positive finite float of seconds, at most ``maximum``.

    Rejects zero, negatives, NaN, infinities and ``bool``.
    """
    if type(value) is float and 0.0 < value <= maximum and value != math.inf:
        return value  # the common case, without the slow ABC check below (200 ns)
    # Decimal is not a numbers.Real, but a TTL read from configuration may well be one.
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise TypeError(f"{name} must be a positive number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (OverflowError, ValueError):  # beyond float range (10**400), a signaling NaN
        raise ValueError(
            f"{name} must be a positive finite number of seconds, got {value!r}"
        ) from None
    if not (0 < seconds < math.inf and seconds <= maximum):  # also rejects NaN
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return seconds


def finite_seconds(name: str, value: object) -> float:
    """``value`` as a finite float (an instant on a clock: any sign); rejects NaN and ``bool``."""
    if type(value) is float and -math.inf < value < math.inf:
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise TypeError(f"{name} must be a finite number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (OverflowError, ValueError):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}") from None
    if not -math.inf < seconds < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return seconds


def ttl_or_none(name: str, value: object) -> float | None:
    """A TTL: positive finite seconds, or ``None`` for "no expiry"."""
    return None if value is None else positive_seconds(name, value)
