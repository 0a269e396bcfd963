"""Token-bucket rate limiting on a TTLStore: per-key buckets, exact arithmetic, lossless expiry.

Each key's bucket is kept as a GCRA *theoretical arrival time* (TAT): the instant at which the
bucket would be full again. Tokens at ``now`` are ``capacity - (TAT - now) * rate``, so time
passing changes nothing in memory, and a request of ``cost`` moves the TAT ``cost / rate``
later. Times are integers: nanoseconds, scaled per limit so that one token's interval is a
whole number of units (a rate of 3/s counts in thirds of a nanosecond). Nothing is ever
rounded, so there is no drift however the clock is stepped, and rates below 1/s are exact.

A bucket that has refilled is indistinguishable from a fresh one, so its store entry is written
with a TTL that ends exactly when the bucket is full again: the store holds only buckets in
debt, and expiry never changes a decision. The store's ``maxsize`` still bounds memory under a
flood of new keys; evicting a bucket in debt lets its client start afresh ("fails open"), which
:meth:`TokenBucketLimiter.stats` counts.

:class:`Limiter` and :class:`AsyncLimiter` are the protocols the middleware and
:func:`rate_limited` depend on, so a shared (Redis) limiter can stand in for this one.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple, ParamSpec, Protocol, TypeAlias, TypeVar, cast, overload

from ttlstore._checks import positive_int
from ttlstore.store import TTLStore

__all__ = [
    "AsyncLimiter",
    "Decision",
    "Limit",
    "Limiter",
    "LimiterStats",
    "RateLimited",
    "TokenBucketLimiter",
    "rate_limited",
]

P = ParamSpec("P")
R = TypeVar("R")

_NS = 1_000_000_000  # nanoseconds per second; an int, so that int / _NS is correctly rounded
# Bounds on a limit's seconds per token (1 / rate) and window (capacity / rate), far beyond any
# use: every time the limiter derives from them (retry_after, the store's TTL and deadline, in
# float seconds) then stays a finite, non-zero float, and its integer units stay small.
_MIN_SECONDS = Fraction(1, 10**300)
_MAX_SECONDS = Fraction(10**300)

Number: TypeAlias = float | Fraction | Decimal  # an int is accepted wherever a float is


def _exact(name: str, value: object) -> Fraction:
    """``value`` as an exact positive Fraction, or a TypeError/ValueError naming ``name``.

    A float is read as the shortest decimal that prints as it, so ``0.1`` is exactly 1/10 (what
    the caller wrote), not the binary fraction nearest to it.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    exact: Fraction
    if isinstance(value, numbers.Rational):
        exact = Fraction(int(value.numerator), int(value.denominator))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        exact = Fraction(value)
    else:
        as_float = float(value)
        if not math.isfinite(as_float):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        exact = Fraction(repr(as_float))
    if exact <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return exact


def _check_timeout(timeout: object) -> float | None:
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
        rate = _exact("rate", self.rate)
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
        return cls(Fraction(quota) / _exact("seconds", seconds), quota, name)

    @property
    def window(self) -> Fraction:
        """Seconds an empty bucket takes to refill completely: ``capacity / rate``, exactly."""
        return self.capacity / _exact("rate", self.rate)


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


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """An immutable snapshot of a limiter's counters."""

    allowed: int
    """Requests allowed."""
    denied: int
    """Requests refused (they consumed nothing)."""
    fail_open_evictions: int
    """Buckets in debt evicted by the ``maxsize`` bound: each of those clients started afresh."""
    size: int
    """Buckets held now: exactly those in debt (full ones have expired)."""


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


class Limiter(Protocol):
    """A limiter whose ``acquire`` answers at once: what the middleware and decorator need."""

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits every key is held to (for the ``RateLimit-Policy`` field)."""
        ...

    def acquire(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s buckets if all of them have enough."""
        ...


class AsyncLimiter(Protocol):
    """A limiter whose ``acquire`` is a coroutine (a shared store, say); else as Limiter."""

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits every key is held to (for the ``RateLimit-Policy`` field)."""
        ...

    async def acquire(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s buckets if all of them have enough."""
        ...


class _Bucket:
    """One limit in exact integer units: time counts in ``1/scale`` ns, so that one token's
    interval is a whole number of units (``1e9 / rate`` ns is usually not)."""

    __slots__ = ("interval", "limit", "per_second", "scale", "tolerance")

    def __init__(self, limit: Limit) -> None:
        ns_per_token = _NS / _exact("rate", limit.rate)
        self.limit = limit
        self.scale = ns_per_token.denominator
        self.interval = ns_per_token.numerator
        self.tolerance = limit.capacity * self.interval  # how far ahead the TAT may run
        self.per_second = self.scale * _NS

    def view(self, now: int, tat: int) -> tuple[int, float, float]:
        """(whole tokens, seconds until full, seconds until the next token) at ``now``."""
        debt = tat - now
        if debt <= 0:
            return self.limit.capacity, 0.0, 0.0
        tokens = self.tolerance - debt  # in time units: ``interval`` per token
        return (
            tokens // self.interval,
            debt / self.per_second,
            (self.interval - tokens % self.interval) / self.per_second,
        )


def _ttl_until(now: int, full: int) -> float:
    """The TTL (seconds) that puts a store deadline exactly at ``full`` ns, seen from ``now``.

    The store adds the TTL to its float clock, ``now / 1e9``. When ``now_s >= full_s / 2``
    the difference below is exact (Sterbenz) and so is that sum. Otherwise the sum may round
    an ulp off ``full_s``; then ``ttl >= full_s / 2``, so one ulp step of ``ttl`` moves the sum
    by at most one ulp of ``full_s`` and a step or two lands on it. Early would forgive debt,
    late would keep a full bucket: if the exact float cannot be hit, settle for late. (The
    store reads its clock again when it writes, so with a running clock the deadline lands
    the few microseconds of one call later: late, never early.)
    """
    now_s = now / _NS
    full_s = full / _NS
    ttl = full_s - now_s
    for _ in range(4):
        deadline = now_s + ttl
        if deadline == full_s:
            break
        ttl = math.nextafter(ttl, math.inf if deadline < full_s else 0.0)
    while now_s + ttl < full_s:
        ttl = math.nextafter(ttl, math.inf)
    # ttl == 0 only when now and full are one float (a tick of the clock spans more than
    # their distance): the bucket is full within that tick, so the entry may go at once.
    return ttl if ttl > 0 else math.ulp(0.0)


BucketState: TypeAlias = tuple[int, ...]
"""A key's stored value: one TAT per limit, in that limit's units, relative to the epoch."""


class TokenBucketLimiter:
    """Per-key token buckets on a bounded TTLStore; one or several limits, all-or-nothing.

    ``TokenBucketLimiter(rate, capacity)`` for one limit, or ``TokenBucketLimiter(limits=[...])``
    for several (say ``Limit(10, 20, "burst")`` and ``Limit.per(1000, 3600, "hourly")``): a
    request is allowed only if every limit has enough tokens, and a refused one takes from none.

    :param rate: tokens per second (int, float, Fraction or Decimal; exact, may be below 1).
    :param capacity: the most tokens a bucket holds: the burst allowed from a full bucket.
    :param limits: several :class:`Limit` instead of ``rate`` and ``capacity``.
    :param maxsize: the most buckets in debt held at once; beyond it the least recently used
        one is evicted and its client starts afresh (counted as a fail-open eviction).
    :param clock: monotonic seconds as a float; ``time.monotonic`` is read as nanoseconds.
    :param threadsafe: every method is atomic under one lock. ``False`` for use from one
        thread or one event loop only (then sweep :attr:`stores` with an ``AsyncSweeper``).

    Each ``acquire`` costs O(limits) plus a store read and write: O(1), or O(log n) when the
    store files a new deadline.
    """

    __slots__ = (
        "__weakref__",  # ttlstore.metrics holds registered limiters weakly
        "_allowed",
        "_buckets",
        "_denied",
        "_epoch",
        "_max_cost",
        "_now",
        "_store",
    )

    @overload
    def __init__(
        self,
        rate: Number,
        capacity: int,
        *,
        maxsize: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        threadsafe: bool = True,
    ) -> None: ...
    @overload
    def __init__(
        self,
        *,
        limits: Iterable[Limit],
        maxsize: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        threadsafe: bool = True,
    ) -> None: ...
    def __init__(
        self,
        rate: Number | None = None,
        capacity: int | None = None,
        *,
        limits: Iterable[Limit] | None = None,
        maxsize: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        threadsafe: bool = True,
    ) -> None:
        if limits is None:
            if rate is None or capacity is None:
                raise TypeError("give rate and capacity, or limits=[Limit(...), ...]")
            limits = (Limit(rate, capacity),)
        elif rate is not None or capacity is not None:
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
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._buckets = tuple(_Bucket(limit) for limit in chosen)
        self._max_cost = min(limit.capacity for limit in chosen)
        self._now = _ns_clock(clock)
        # Times are kept relative to construction: smaller ints, and float seconds in the
        # store keep nanosecond resolution for weeks instead of since boot.
        self._epoch = self._now()
        epoch, now_ns = self._epoch, self._now

        def store_clock() -> float:
            # The same instants the limiter computes with, so deadlines land exactly.
            return (now_ns() - epoch) / _NS

        self._store: TTLStore[Hashable, BucketState] = TTLStore(
            maxsize, clock=store_clock, threadsafe=threadsafe
        )
        self._allowed = 0
        self._denied = 0

    # ------------------------------------------------------------------ decisions

    def acquire(self, key: Hashable, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from every bucket of ``key`` if all have enough; else none.

        ``ValueError`` at once if ``cost`` exceeds a limit's capacity (it could never pass).
        O(limits) plus one store read and, if allowed, one store write.
        """
        cost = self._check_cost(cost)
        return self._store._run(self._acquire, key, cost)

    def try_acquire(self, key: Hashable, cost: int = 1) -> bool:
        """Whether ``cost`` tokens were taken from ``key``, as :meth:`acquire` does. O(limits)."""
        return self.acquire(key, cost).allowed

    def peek(self, key: Hashable, cost: int = 1) -> Decision:
        """What :meth:`acquire` would answer now, taking nothing and touching no recency.

        ``remaining`` counts the tokens held now, before any deduction. O(limits).
        """
        cost = self._check_cost(cost)
        return self._store._run(self._peek, key, cost)

    def reset(self, key: Hashable) -> None:
        """Forget ``key``'s buckets: it starts full, as a new key does. O(1).

        Atomic with :meth:`acquire` (both hold the store's lock): a reset never lands between
        an acquire's read of the bucket and its write, which would bring the old debt back.
        """
        self._store.pop(key, None)

    async def wait(self, key: Hashable, cost: int = 1, timeout: float | None = None) -> Decision:
        """Acquire ``cost`` tokens, sleeping until they are there; return the decision.

        Sleeps exactly the ``retry_after`` of each refusal, then asks again (another waiter
        may have been first). Raises :class:`RateLimited` at once when the wait needed would
        end after ``timeout`` seconds. Cancelling the caller while it sleeps takes nothing.
        """
        return await _wait_async(self.acquire, key, cost, _check_timeout(timeout))

    # ------------------------------------------------------------------ introspection

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits every key is held to."""
        return tuple(bucket.limit for bucket in self._buckets)

    @property
    def stores(self) -> tuple[TTLStore[Hashable, BucketState], ...]:
        """The stores holding the buckets, for a sweeper: ``AsyncSweeper(*limiter.stores)``."""
        return (self._store,)

    @property
    def maxsize(self) -> int:
        """The most buckets in debt held at once."""
        return self._store.maxsize

    def stats(self) -> LimiterStats:
        """An immutable snapshot of the counters, after reclaiming full buckets. O(1) amortized."""
        self._store._reclaim_backlog()
        return self._store._run(self._stats)

    def _stats(self) -> LimiterStats:
        """:meth:`stats` under the store's lock: one instant for every field."""
        store = self._store._stats()
        return LimiterStats(
            allowed=self._allowed,
            denied=self._denied,
            # Every eviction is a fail-open one: the store reclaims due entries before it
            # evicts, and a live entry is by construction a bucket in debt.
            fail_open_evictions=store.evictions,
            size=store.size,
        )

    def __repr__(self) -> str:
        limits = ", ".join(f"{b.limit.capacity}@{b.limit.rate}/s" for b in self._buckets)
        return f"<TokenBucketLimiter limits=[{limits}] maxsize={self._store.maxsize}>"

    # ------------------------------------------------------------------ plumbing

    # The read-decide-write of a request runs as one step under the store's own lock (one
    # lock, not the three that a limiter lock around store.get and store.set would take), on
    # the store's unlocked internals: a contract between two modules of this package.

    def _acquire(self, key: Hashable, cost: int) -> Decision:
        """:meth:`acquire` under the store's lock."""
        store = self._store
        # A read (not peek) also for refusals: a client that keeps knocking stays recent, so a
        # flood of new keys evicts idle buckets before an active abuser's.
        entry = store._live(key)
        if entry is None:
            store._misses += 1  # as store.get() would count it
            state = None
        else:
            state = store._hit(entry)
        # Read the clock after the store did: an entry the store found expired is then
        # certainly full at ``now`` too.
        now = self._now() - self._epoch
        decision, new_state = self._decide(state, now, cost)
        if new_state is None:
            self._denied += 1
        else:
            ttl = _ttl_until(now, self._full_at(new_state, now))
            store._set(key, new_state, ttl, 0, False)
            self._allowed += 1
        return decision

    def _peek(self, key: Hashable, cost: int) -> Decision:
        """:meth:`peek` under the store's lock."""
        entry = self._store._live(key)
        state = None if entry is None else entry.value
        return self._decide(state, self._now() - self._epoch, cost, take=False)[0]

    def _check_cost(self, cost: object) -> int:
        """``cost`` as a positive int that every limit can grant, else TypeError/ValueError."""
        if type(cost) is not int or not 0 < cost <= self._max_cost:  # one test when fine
            cost = positive_int("cost", cost)
            if cost > self._max_cost:
                limit = min(self.limits, key=lambda limit: limit.capacity)
                raise ValueError(
                    f"cost {cost} exceeds capacity {limit.capacity} of {limit!r}: "
                    "such a request could never be allowed"
                )
        return cost

    def _decide(
        self, state: BucketState | None, now: int, cost: int, take: bool = True
    ) -> tuple[Decision, BucketState | None]:
        """Decide a request of ``cost`` at ``now`` (ns since the epoch) against ``state``.

        Returns the decision and the new state (None if refused: nothing is taken). An
        allowed decision describes the buckets after the request if ``take``, else as they
        are. O(limits), integers only.
        """
        buckets = self._buckets
        if len(buckets) == 1:
            return self._decide_one(buckets[0], state, now, cost, take)
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

    @staticmethod
    def _decide_one(
        bucket: _Bucket, state: BucketState | None, now: int, cost: int, take: bool
    ) -> tuple[Decision, BucketState | None]:
        """:meth:`_decide` for a limiter of one limit (the common case), without the lists."""
        scaled_now = now * bucket.scale
        tat = scaled_now if state is None or state[0] < scaled_now else state[0]
        new_tat = tat + cost * bucket.interval
        wait = new_tat - bucket.tolerance - scaled_now
        if wait > 0:
            remaining, reset_after, refill_after = bucket.view(scaled_now, tat)
            retry_after = wait / bucket.per_second
            refused = Decision(
                False, remaining, retry_after, reset_after, refill_after, bucket.limit
            )
            return refused, None
        remaining, reset_after, refill_after = bucket.view(scaled_now, new_tat if take else tat)
        return Decision(True, remaining, 0.0, reset_after, refill_after, bucket.limit), (new_tat,)

    def _full_at(self, state: BucketState, now: int) -> int:
        """The first whole nanosecond (since the epoch) at which every bucket is full. O(limits)."""
        buckets = self._buckets
        if len(buckets) == 1:
            return max(now, -(-state[0] // buckets[0].scale))
        full = now
        for tat, bucket in zip(state, self._buckets, strict=True):
            at = -(-tat // bucket.scale)  # ceil: full once now * scale >= tat
            if at > full:
                full = at
        return full


def _ns_clock(clock: Callable[[], float]) -> Callable[[], int]:
    """A reader of ``clock`` in integer nanoseconds (one float conversion per reading)."""
    if clock is time.monotonic:
        return time.monotonic_ns  # the same clock, without the float rounding

    def now_ns() -> int:
        return round(clock() * _NS)

    return now_ns


# ---------------------------------------------------------------------- waiting


def _sleep_for(decision: Decision, deadline: float | None, now: float) -> float:
    """Seconds to sleep after a refusal, or RateLimited if that would pass ``deadline``."""
    if deadline is not None and now + decision.retry_after > deadline:
        raise RateLimited(decision.retry_after, decision=decision)
    return decision.retry_after


def _wait_sync(
    acquire: Callable[[Any, int], Decision], key: Any, cost: int, timeout: float | None
) -> Decision:
    """Acquire, sleeping (blocking the thread) each refusal's ``retry_after``, until allowed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    decision = acquire(key, cost)
    while not decision.allowed:
        time.sleep(_sleep_for(decision, deadline, time.monotonic()))
        decision = acquire(key, cost)
    return decision


async def _wait_async(
    acquire: Callable[[Any, int], Decision | Awaitable[Decision]],
    key: Any,
    cost: int,
    timeout: float | None,
) -> Decision:
    """Acquire, sleeping each refusal's ``retry_after`` on the loop, until allowed.

    ``acquire`` may be a plain function or a coroutine function. Nothing is taken while
    sleeping, so a cancellation leaves every bucket as it was.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        result = acquire(key, cost)
        decision = await result if inspect.isawaitable(result) else result
        if decision.allowed:
            return decision
        await asyncio.sleep(_sleep_for(decision, deadline, loop.time()))


# ---------------------------------------------------------------------- decorator


def rate_limited(
    limiter: Limiter | AsyncLimiter,
    *,
    key: Callable[..., str] | None = None,
    cost: int = 1,
    wait: bool = False,
    timeout: float | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Rate-limit calls of a sync or async function through ``limiter``.

    ``key(*args, **kwargs)`` names the bucket of a call; without it, all calls of the function
    share one bucket. A refused call raises :class:`RateLimited` (and the function does not
    run), or with ``wait=True`` waits until allowed, up to ``timeout`` seconds: on the event
    loop for an async function, with ``time.sleep`` (blocking the thread) for a sync one.
    An async limiter (a coroutine ``acquire``) can only guard async functions.
    """
    cost = positive_int("cost", cost)
    if not isinstance(wait, bool):
        raise TypeError(f"wait must be a bool, got {wait!r}")
    if timeout is not None and not wait:
        raise ValueError("timeout only applies with wait=True")
    # Without wait, a refusal raises at once: the same as waiting with no time to spare.
    budget = _check_timeout(timeout) if wait else 0.0
    if key is not None and not callable(key):
        raise TypeError(f"key must be callable or None, got {key!r}")
    limiter_is_async = inspect.iscoroutinefunction(limiter.acquire)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        shared = f"{func.__module__}.{func.__qualname__}"

        def key_of(*args: Any, **kwargs: Any) -> str:
            return shared if key is None else key(*args, **kwargs)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                await _wait_async(limiter.acquire, key_of(*args, **kwargs), cost, budget)
                return await func(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)
        if limiter_is_async:
            raise TypeError(
                f"{func.__qualname__} is synchronous but {limiter!r} acquires asynchronously; "
                "guard an async function, or use a limiter with a synchronous acquire"
            )
        acquire = cast(Callable[[Any, int], Decision], limiter.acquire)

        @functools.wraps(func)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            _wait_sync(acquire, key_of(*args, **kwargs), cost, budget)
            return func(*args, **kwargs)

        return sync_wrapper

    return decorate
