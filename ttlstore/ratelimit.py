"""Token-bucket rate limiting on a TTLStore: per-key buckets, exact arithmetic, lossless expiry.

The arithmetic (GCRA, exact integer time units) is :mod:`ttlstore._gcra`, shared with the Redis
limiter. Each key's bucket state goes into one store entry, read, decided and written back by
one :meth:`TTLStore.compute`, so an ``acquire`` holds the store's lock exactly once.

A bucket that has refilled is indistinguishable from a fresh one, so its store entry is written
with a TTL that ends exactly when the bucket is full again: the store holds only buckets in
debt, and expiry never changes a decision. The store's ``maxsize`` still bounds memory under a
flood of new keys; evicting a bucket in debt lets its client start afresh ("fails open"), which
:meth:`TokenBucketLimiter.stats` counts.

:class:`Limiter` and :class:`AsyncLimiter` are the protocols the middleware and
:func:`rate_limited` depend on, so a shared (Redis) limiter can stand in for this one.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast, overload

from ttlstore._bucket_steps import LimiterCore, store_clock_for
from ttlstore._checks import positive_int
from ttlstore._gcra import (
    NS,
    Decision,
    Limit,
    Number,
    RateLimited,
    State,
    buckets_of,
    check_cost,
    check_timeout,
    decide,
    limits_from,
    wait_async,
    wait_sync,
)
from ttlstore.store import TTLStore

__all__ = [
    "AsyncLimiter",
    "Decision",
    "Limit",
    "Limiter",
    "LimiterStats",
    "Number",
    "RateLimited",
    "TokenBucketLimiter",
    "rate_limited",
]

P = ParamSpec("P")
R = TypeVar("R")


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


class TokenBucketLimiter(LimiterCore):
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

    Each ``acquire`` is one :meth:`TTLStore.compute` (one lock hold): O(limits) plus a store
    read and write, O(1), or O(log n) when the store files a new deadline.
    """

    # ttlstore.metrics holds registered limiters weakly; the rest of the state is
    # LimiterCore's.
    __slots__ = ("__weakref__",)

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
        chosen = limits_from(rate, capacity, limits)
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        now_ns = _ns_clock(clock)
        # Times are kept relative to construction: smaller ints, and float seconds in the
        # store keep nanosecond resolution for weeks instead of since boot.
        epoch = now_ns()
        store: TTLStore[Hashable, State] = TTLStore(
            maxsize, clock=store_clock_for(now_ns, epoch), threadsafe=threadsafe
        )
        super().__init__(buckets_of(chosen), now_ns, store, epoch)

    # ------------------------------------------------------------------ decisions

    if TYPE_CHECKING:
        # The typed signature; the body is LimiterCore's (compiled with the core).
        def acquire(self, key: Hashable, cost: int = 1) -> Decision:
            """Take ``cost`` tokens from every bucket of ``key`` if all have enough."""
            ...

    def try_acquire(self, key: Hashable, cost: int = 1) -> bool:
        """Whether ``cost`` tokens were taken from ``key``, as :meth:`acquire` does. O(limits)."""
        return self.acquire(key, cost).allowed

    def peek(self, key: Hashable, cost: int = 1) -> Decision:
        """What :meth:`acquire` would answer now, taking nothing and touching no recency.

        ``remaining`` counts the tokens held now, before any deduction. O(limits).
        """
        cost = check_cost(self._buckets, cost)
        state = self._store.peek(key)
        # After the store's read, as in acquire: a bucket it no longer holds is full now.
        return decide(self._buckets, state, self._now() - self._epoch, cost, take=False)[0]

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
        return await wait_async(self.acquire, key, cost, check_timeout(timeout))

    # ------------------------------------------------------------------ introspection

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits every key is held to."""
        return tuple(bucket.limit for bucket in self._buckets)

    @property
    def stores(self) -> tuple[TTLStore[Hashable, State], ...]:
        """The stores holding the buckets, for a sweeper: ``AsyncSweeper(*limiter.stores)``."""
        return (self._store,)

    @property
    def maxsize(self) -> int:
        """The most buckets in debt held at once."""
        return self._store.maxsize

    def stats(self) -> LimiterStats:
        """An immutable snapshot of the counters; reclaims nothing. Cost as ``store.stats()``.

        Each field is exact; ``allowed`` and ``denied`` are read just before the store's
        figures, so a request deciding meanwhile may show in one and not yet the other.
        """
        allowed, denied = self._tally.allowed, self._tally.denied
        store = self._store.stats()
        return LimiterStats(
            allowed=allowed,
            denied=denied,
            # Every eviction is a fail-open one: the store reclaims due entries before it
            # evicts, and a live entry is by construction a bucket in debt.
            fail_open_evictions=store.evictions,
            size=store.size,
        )

    def __repr__(self) -> str:
        limits = ", ".join(f"{b.limit.capacity}@{b.limit.rate}/s" for b in self._buckets)
        return f"<TokenBucketLimiter limits=[{limits}] maxsize={self._store.maxsize}>"


def _ns_clock(clock: Callable[[], float]) -> Callable[[], int]:
    """A reader of ``clock`` in integer nanoseconds (one float conversion per reading)."""
    if clock is time.monotonic:
        return time.monotonic_ns  # the same clock, without the float rounding

    def now_ns() -> int:
        return round(clock() * NS)

    return now_ns


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
    budget = check_timeout(timeout) if wait else 0.0
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
                await wait_async(limiter.acquire, key_of(*args, **kwargs), cost, budget)
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
            wait_sync(acquire, key_of(*args, **kwargs), cost, budget)
            return func(*args, **kwargs)

        return sync_wrapper

    return decorate
