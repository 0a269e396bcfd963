"""The token-bucket (GCRA) model shared by the in-memory and the Redis limiters.

Each key's bucket is kept as a GCRA *theoretical arrival time* (TAT): the instant at which the
bucket would be full again. Tokens at ``now`` are ``capacity - (TAT - now) * rate``, so time
passing changes nothing in memory, and a request of ``cost`` moves the TAT ``cost / rate``
later. Times are integers: nanoseconds, scaled per limit so that one token's interval is a
whole number of units (a rate of 3/s counts in thirds of a nanosecond). Nothing is ever
rounded, so there is no drift however the clock is stepped, and rates below 1/s are exact.

The API is a handful of functions over a tuple of :class:`Bucket` (one per limit) and a
:data:`State` (one TAT per limit); a backend only stores the state and supplies ``now``:

- :func:`limits_from` applies the constructor rules (``rate, capacity`` or ``limits=[...]``);
- :func:`buckets_of` turns limits into exact integer units;
- :func:`check_cost` refuses a cost no limit could ever grant;
- :func:`decide` answers a request against a state at ``now`` and gives the new state;
- :func:`full_at` is the instant every bucket is full again: when the state may be dropped;
- :func:`wait_sync` / :func:`wait_async` sleep on refusals until a request passes.

The value types users see (:class:`Limit`, :class:`Decision`, :class:`RateLimited`) live here
too, so that both limiters build them alike; :mod:`ttlstore.ratelimit` re-exports them.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple, TypeAlias

from ttlstore._checks import positive_int

__all__ = [
    "NS",
    "Bucket",
    "Decision",
    "Limit",
    "Number",
    "RateLimited",
    "State",
    "buckets_of",
    "check_cost",
    "check_timeout",
    "decide",
    "exact",
    "full_at",
    "limits_from",
    "wait_async",
    "wait_sync",
]

NS = 1_000_000_000
"""Nanoseconds per second; an int, so that ``int / NS`` is correctly rounded."""

# Bounds on a limit's seconds per token (1 / rate) and window (capacity / rate), far beyond any
# use: every time the limiter derives from them (retry_after, the store's TTL and deadline, in
# float seconds) then stays a finite, non-zero float, and its integer units stay small.
_MIN_SECONDS = Fraction(1, 10**300)
_MAX_SECONDS = Fraction(10**300)

Number: TypeAlias = float | Fraction | Decimal  # an int is accepted wherever a float is

State: TypeAlias = tuple[int, ...]
"""A key's stored bucket state: one TAT per limit, in that limit's units (1/scale ns)."""


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


class Bucket:
    """One limit in exact integer units: time counts in ``1/scale`` ns, so that one token's
    interval is a whole number of units (``1e9 / rate`` ns is usually not)."""

    __slots__ = ("interval", "limit", "per_second", "scale", "tolerance")

    def __init__(self, limit: Limit) -> None:
        ns_per_token = NS / exact("rate", limit.rate)
        self.limit = limit
        self.scale = ns_per_token.denominator
        """Units per nanosecond."""
        self.interval = ns_per_token.numerator
        """Units per token."""
        self.tolerance = limit.capacity * self.interval
        """How far ahead of ``now`` the TAT may run: a full bucket's worth of units."""
        self.per_second = self.scale * NS
        """Units per second."""

    def view(self, now: int, tat: int) -> tuple[int, float, float]:
        """(whole tokens, seconds until full, seconds until the next token) at ``now`` (units)."""
        debt = tat - now
        if debt <= 0:
            return self.limit.capacity, 0.0, 0.0
        tokens = self.tolerance - debt  # in time units: ``interval`` per token
        return (
            tokens // self.interval,
            debt / self.per_second,
            (self.interval - tokens % self.interval) / self.per_second,
        )


def buckets_of(limits: Iterable[Limit]) -> tuple[Bucket, ...]:
    """One :class:`Bucket` per limit, in order."""
    return tuple(Bucket(limit) for limit in limits)


def check_cost(buckets: tuple[Bucket, ...], cost: object) -> int:
    """``cost`` as a positive int that every limit can grant, else TypeError/ValueError.

    A cost above the smallest capacity could never be allowed: it fails here, at once,
    rather than waiting forever. O(1) for a cost of 1, O(limits) otherwise.
    """
    if cost == 1 and type(cost) is int:  # every capacity is at least 1
        return 1
    cost = positive_int("cost", cost)
    smallest = min((bucket.limit for bucket in buckets), key=lambda limit: limit.capacity)
    if cost > smallest.capacity:
        raise ValueError(
            f"cost {cost} exceeds capacity {smallest.capacity} of {smallest!r}: "
            "such a request could never be allowed"
        )
    return cost


def decide(
    buckets: tuple[Bucket, ...], state: State | None, now: int, cost: int, take: bool = True
) -> tuple[Decision, State | None]:
    """Decide a request of ``cost`` at ``now`` (integer ns) against ``state`` (None: full).

    Returns the decision and the new state (None if refused: nothing is taken). An allowed
    decision describes the buckets after the request if ``take``, else as they are. All
    limits pass or none is charged. O(limits), integers only.
    """
    if len(buckets) == 1:
        return _decide_one(buckets[0], state, now, cost, take)
    tats: list[int] = []
    new_tats: list[int] = []
    worst = -1  # the limit that refuses with the longest wait, if any
    worst_wait = 0
    worst_scale = 1
    for i, bucket in enumerate(buckets):
        scaled_now = now * bucket.scale
        tat = scaled_now if state is None or state[i] < scaled_now else state[i]
        new_tat = tat + cost * bucket.interval
        tats.append(tat)
        new_tats.append(new_tat)
        wait = new_tat - bucket.tolerance - scaled_now
        # Waits of different limits count in different units: compare wait/scale exactly.
        # Strictly greater, so the first listed wins a tie.
        if wait > 0 and wait * worst_scale > worst_wait * bucket.scale:
            worst, worst_wait, worst_scale = i, wait, bucket.scale
    if worst >= 0:
        bucket = buckets[worst]
        remaining, reset_after, refill_after = bucket.view(now * worst_scale, tats[worst])
        retry_after = worst_wait / bucket.per_second
        return Decision(
            False, remaining, retry_after, reset_after, refill_after, bucket.limit
        ), None
    best = 0
    best_view = (0, 0.0, 0.0)
    for i, tat in enumerate(new_tats if take else tats):
        bucket = buckets[i]
        view = bucket.view(now * bucket.scale, tat)
        if i == 0 or view[0] < best_view[0]:
            best, best_view = i, view
    limit = buckets[best].limit
    return Decision(True, best_view[0], 0.0, best_view[1], best_view[2], limit), tuple(new_tats)


def _decide_one(
    bucket: Bucket, state: State | None, now: int, cost: int, take: bool
) -> tuple[Decision, State | None]:
    """:func:`decide` for one limit (the common case), without the lists."""
    scaled_now = now * bucket.scale
    tat = scaled_now if state is None or state[0] < scaled_now else state[0]
    new_tat = tat + cost * bucket.interval
    wait = new_tat - bucket.tolerance - scaled_now
    if wait > 0:
        remaining, reset_after, refill_after = bucket.view(scaled_now, tat)
        retry_after = wait / bucket.per_second
        return Decision(
            False, remaining, retry_after, reset_after, refill_after, bucket.limit
        ), None
    remaining, reset_after, refill_after = bucket.view(scaled_now, new_tat if take else tat)
    return Decision(True, remaining, 0.0, reset_after, refill_after, bucket.limit), (new_tat,)


def full_at(buckets: tuple[Bucket, ...], state: State, now: int) -> int:
    """The first whole nanosecond, not before ``now``, at which every bucket is full.

    From then on ``state`` says nothing a fresh bucket would not: it may be dropped (a store
    entry's deadline, a Redis key's ``PEXPIREAT``). O(limits).
    """
    if len(buckets) == 1:
        return max(now, -(-state[0] // buckets[0].scale))
    full = now
    for tat, bucket in zip(state, buckets, strict=True):
        at = -(-tat // bucket.scale)  # ceil: full once now * scale >= tat
        if at > full:
            full = at
    return full


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
