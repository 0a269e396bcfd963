"""The token-bucket limiters' value types and plumbing: limits, decisions, waiting.

Shared by the in-memory and the Redis limiters and re-exported by :mod:`ttlstore.ratelimit`;
interpreted in every build (the arithmetic on them, :mod:`ttlstore._gcra`, is what mypyc
compiles: these are user-facing types whose checks must name the argument, and a compiled
dataclass would check its field types first, with mypyc's own message).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final, NamedTuple, TypeAlias

from ttlstore._checks import positive_int

__all__ = [
    "NS",
    "Decision",
    "Limit",
    "Number",
    "RateLimited",
    "check_timeout",
    "exact",
    "limits_from",
    "wait_async",
    "wait_sync",
]

NS: Final = 1_000_000_000
"""Nanoseconds per second; an int, so that ``int / NS`` is correctly rounded."""

# Bounds on a limit's seconds per token (1 / rate) and window (capacity / rate), far beyond any
# use: every time the limiter derives from them (retry_after, the store's TTL and deadline, in
# float seconds) then stays a finite, non-zero float, and its integer units stay small.
_MIN_SECONDS = Fraction(1, 10**300)
_MAX_SECONDS = Fraction(10**300)

Number: TypeAlias = float | Fraction | Decimal  # an int is accepted wherever a float is


def exact(name: str, value: object) -> Fraction:
    """``value`` as an exact positive Fraction, or a TypeError/ValueError naming ``name``.

    A float is read as the shortest decimal that prints as it, so ``0.1`` is exactly 1/10 (what
    the caller wrote), not the binary fraction nearest to it.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    result: Fraction
    if isinstance(value, numbers.Rational):
        result = Fraction(int(value.numerator), int(value.denominator))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        result = Fraction(value)
    else:
        as_float = float(value)
        if not math.isfinite(as_float):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        result = Fraction(repr(as_float))
    if result <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return result


def check_timeout(timeout: object) -> float | None:
    """``timeout`` as non-negative finite seconds or None, else a TypeError/ValueError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"timeout must be a non-negative finite number, got {timeout!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Limit:
    """One token bucket: ``capacity`` tokens at most, refilled at ``rate`` tokens per second.

    A full bucket allows a burst of ``capacity``; after that, ``rate`` per second. ``name``
    identifies the limit in decisions and in the ``RateLimit`` header fields (printable ASCII);
    a limiter with several limits needs a distinct name on each.
    """

    rate: Number
    capacity: int
    name: str | None = None

    def __post_init__(self) -> None:
        rate = exact("rate", self.rate)
        capacity = positive_int("capacity", self.capacity)
        if 1 / rate < _MIN_SECONDS:
            raise ValueError(
                f"rate must be at most 1e300 per second (the seconds per token, 1 / rate, "
                f"must fit in a float), got {self.rate!r}"
            )
        if capacity / rate > _MAX_SECONDS:
            raise ValueError(
                f"rate must be at least capacity / 1e300 per second (the seconds an empty "
                f"bucket takes to refill, capacity / rate, must fit in a float), got "
                f"{self.rate!r} with capacity {capacity}"
            )
        if self.name is not None:
            if not isinstance(self.name, str):
                raise TypeError(f"name must be a str or None, got {self.name!r}")
            # It travels as a Structured Field String: printable ASCII only.
            if not self.name or not all(" " <= ch <= "~" for ch in self.name):
                raise ValueError(f"name must be non-empty printable ASCII, got {self.name!r}")

    @classmethod
    def per(cls, quota: int, seconds: Number, name: str | None = None) -> Limit:
        """``quota`` tokens per ``seconds``, burst ``quota``: ``Limit.per(1000, 3600, "hourly")``.

        The rate is the exact fraction ``quota / seconds``, so no float rounding creeps in.
        """
        quota = positive_int("quota", quota)
        return cls(Fraction(quota) / exact("seconds", seconds), quota, name)

    @property
    def window(self) -> Fraction:
        """Seconds an empty bucket takes to refill completely: ``capacity / rate``, exactly."""
        return self.capacity / exact("rate", self.rate)


class Decision(NamedTuple):
    """The answer to one request: allowed or not, and the state of the binding limit.

    With several limits, ``limit`` is the most restrictive one: on a refusal the one that
    needs the longest wait, otherwise the one with the fewest tokens left (the first listed on
    a tie); the other fields describe that limit. Truthy exactly when ``allowed``. Immutable;
    a named tuple, because building a frozen dataclass cost a sixth of an ``acquire``.
    """

    allowed: bool
    remaining: int
    """Whole tokens left after this request (the request's cost is already taken if allowed)."""
    retry_after: float
    """Seconds until the same request would be allowed; 0.0 when allowed."""
    reset_after: float
    """Seconds until the bucket is full again (0.0 if it is full)."""
    refill_after: float
    """Seconds until ``remaining`` next grows by one (0.0 if the bucket is full)."""
    limit: Limit
    degraded: str | None = None
    """Why the decision was taken without the backend (a Redis limiter's ``on_error``
    policy answered for it); ``None`` for a real decision."""

    def __bool__(self) -> bool:
        return self.allowed


class RateLimited(Exception):
    """A request was refused by a rate limit; ``retry_after`` seconds until it would pass."""

    def __init__(self, retry_after: float, *, decision: Decision | None = None) -> None:
        # Only retry_after goes to args, so pickling re-creates the exception; decision rides
        # along in __dict__, which BaseException pickles too.
        super().__init__(retry_after)
        self.retry_after = retry_after
        self.decision = decision

    def __str__(self) -> str:
        name = self.decision.limit.name if self.decision is not None else None
        which = f" by limit {name!r}" if name else ""
        return f"rate limited{which}: retry after {self.retry_after:.3f} s"


def limits_from(
    rate: Number | None, capacity: int | None, limits: Iterable[Limit] | None
) -> tuple[Limit, ...]:
    """The limits a limiter's constructor was given: ``rate`` and ``capacity``, or ``limits``.

    Raises TypeError/ValueError for a wrong combination, an empty list, a non-Limit, or
    several limits without distinct names.
    """
    if limits is None:
        if rate is None or capacity is None:
            raise TypeError("give rate and capacity, or limits=[Limit(...), ...]")
        return (Limit(rate, capacity),)
    if rate is not None or capacity is not None:
        raise TypeError("give rate and capacity, or limits, not both")
    chosen = tuple(limits)
    if not chosen:
        raise ValueError("limits must hold at least one Limit")
    for limit in chosen:
        if not isinstance(limit, Limit):
            raise TypeError(f"limits must hold Limit instances, got {limit!r}")
    names = [limit.name for limit in chosen]
    if len(chosen) > 1 and (None in names or len(set(names)) != len(names)):
        raise ValueError(f"several limits need distinct names, got {names!r}")
    return chosen


# ---------------------------------------------------------------------- waiting


def _sleep_for(decision: Decision, deadline: float | None, now: float) -> float:
    """Seconds to sleep after a refusal, or RateLimited if that would pass ``deadline``."""
    if deadline is not None and now + decision.retry_after > deadline:
        raise RateLimited(decision.retry_after, decision=decision)
    return decision.retry_after


def wait_sync(
    acquire: Callable[[Any, int], Decision], key: Any, cost: int, timeout: float | None
) -> Decision:
    """Acquire, sleeping (blocking the thread) each refusal's ``retry_after``, until allowed.

    Raises :class:`RateLimited` at once when the wait would end after ``timeout`` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    decision = acquire(key, cost)
    while not decision.allowed:
        time.sleep(_sleep_for(decision, deadline, time.monotonic()))
        decision = acquire(key, cost)
    return decision


async def wait_async(
    acquire: Callable[[Any, int], Decision | Awaitable[Decision]],
    key: Any,
    cost: int,
    timeout: float | None,
) -> Decision:
    """Acquire, sleeping each refusal's ``retry_after`` on the loop, until allowed.

    ``acquire`` may be a plain function or a coroutine function. Nothing is taken while
    sleeping, so a cancellation leaves every bucket as it was. Raises :class:`RateLimited` at
    once when the wait would end after ``timeout`` seconds.
    """
    import asyncio  # here, not at the top: `import ttlstore` must not load asyncio
    import inspect

    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        result = acquire(key, cost)
        decision = await result if inspect.isawaitable(result) else result
        if decision.allowed:
            return decision
        await asyncio.sleep(_sleep_for(decision, deadline, loop.time()))
