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

The value types users see (:class:`Limit`, :class:`Decision`, :class:`RateLimited`), the
constructor rules and the waiting helpers are :mod:`ttlstore._limits`'s, re-exported here so
that a limiter imports one module. This module is compiled by mypyc when the core is
(acquire 1.2-1.5x faster than interpreted); ``_limits`` stays interpreted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, TypeAlias, cast

from ttlstore._checks import positive_int
from ttlstore._limits import (
    NS,
    Decision,
    Limit,
    Number,
    RateLimited,
    check_timeout,
    exact,
    limits_from,
    wait_async,
    wait_sync,
)

__all__ = [
    "DECISION",
    "NS",
    "Bucket",
    "Decision",
    "DecisionFields",
    "Limit",
    "Number",
    "RateLimited",
    "State",
    "buckets_of",
    "check_cost",
    "check_timeout",
    "decide",
    "decide_fields",
    "exact",
    "full_at",
    "limits_from",
    "new_decision",
    "take_one",
    "wait_async",
    "wait_sync",
]

State: TypeAlias = tuple[int, ...]
"""A key's stored bucket state: one TAT per limit, in that limit's units (1/scale ns)."""


DecisionFields: TypeAlias = tuple[bool, int, float, float, float, Limit, "str | None"]
"""A :class:`Decision`'s fields in a plain tuple: what the arithmetic answers, and what
the rate-limit middleware reads without the named tuple being built (see
:func:`ttlstore._bucket_steps.acquire_fields`)."""

# A Decision straight from its fields: the named tuple's own constructor is a Python function
# that cost about as much again as the tuple (measured 650 vs 290 ns, CPython 3.11). Called
# directly rather than through functools.partial, which copies the argument tuple first.
# Decision as a Final: compiled, a C static rather than a lookup in the module's globals.
# Both are also what the in-memory limiter's acquire() builds its Decision with.
DECISION: Final = Decision
new_decision: Final = cast(Callable[[type[Decision], DecisionFields], Decision], tuple.__new__)


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
    # Every capacity is at least 1. The type test comes first: compiled by mypyc, a `cost == 1`
    # first let True through (the comparison narrowed `cost` to int for the test after it).
    if type(cost) is int and cost == 1:
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
    fields, new_state = decide_fields(buckets, state, now, cost, take)
    return new_decision(DECISION, fields), new_state


def decide_fields(
    buckets: tuple[Bucket, ...], state: State | None, now: int, cost: int, take: bool = True
) -> tuple[DecisionFields, State | None]:
    """:func:`decide`, the decision's fields in a plain tuple. O(limits)."""
    if len(buckets) == 1:
        fields, new_state, _ = take_one(buckets[0], state, now, cost, take)
        return fields, new_state
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
        return (False, remaining, retry_after, reset_after, refill_after, bucket.limit, None), None
    best = 0
    best_view = (0, 0.0, 0.0)
    for i, tat in enumerate(new_tats if take else tats):
        bucket = buckets[i]
        view = bucket.view(now * bucket.scale, tat)
        if i == 0 or view[0] < best_view[0]:
            best, best_view = i, view
    limit = buckets[best].limit
    return (True, best_view[0], 0.0, best_view[1], best_view[2], limit, None), tuple(new_tats)


def take_one(
    bucket: Bucket, state: State | None, now: int, cost: int, take: bool = True
) -> tuple[DecisionFields, State | None, int]:
    """:func:`decide_fields` for one limit (the common case), plus when the new state is spent.

    Returns the decision's fields, the new state (None if refused) and, if allowed, the first
    whole nanosecond at which the bucket is full again (:func:`full_at` of the new state),
    else 0. One call with no lists: the in-memory limiter's whole arithmetic per request.
    O(1). Replacing decide() -> _decide_one() -> Bucket.view() with it took acquire from
    36.5 k to 31.3 k instructions (callgrind, CPython 3.11); 0.75 k of that came from a copy
    of view() written out here, since dropped so that view() stays the one definition.
    """
    scale = bucket.scale
    # Most rates give whole nanoseconds per token (scale 1). Compiled, a product with a factor
    # past 2**30 leaves mypyc's fast integer path, so it is skipped when there is nothing to do.
    scaled_now = now if scale == 1 else now * scale
    tat = scaled_now if state is None or state[0] < scaled_now else state[0]
    # A cost of 1 needs no product: compiled, an interval past 2**30 units (a token a
    # second or slower) makes one a long multiplication (300 instructions).
    new_tat = tat + (bucket.interval if cost == 1 else cost * bucket.interval)
    wait = new_tat - bucket.tolerance - scaled_now
    if wait > 0:
        remaining, reset_after, refill_after = bucket.view(scaled_now, tat)
        retry_after = wait / bucket.per_second
        refused = (False, remaining, retry_after, reset_after, refill_after, bucket.limit, None)
        return refused, None, 0
    remaining, reset_after, refill_after = bucket.view(scaled_now, new_tat if take else tat)
    fields = (True, remaining, 0.0, reset_after, refill_after, bucket.limit, None)
    # Full once now * scale >= new_tat: the ceiling, never before now since new_tat > now.
    return fields, (new_tat,), -(-new_tat // scale)


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
