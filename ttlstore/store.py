"""TTLStore: a bounded mapping with per-entry TTL, LRU eviction and removal callbacks.

Layout: an ``OrderedDict`` from key to one small :class:`~ttlstore._deadlines.Entry` keeps the
recency order (least recently used first), and a :class:`~ttlstore._deadlines.DeadlineIndex`
finds due entries without scanning. Reads check the entry's own deadline, so the index only
decides *when memory is reclaimed*, never what is visible. This module holds the public
surface; the state and the steps under the lock are :class:`~ttlstore._core.StoreCore`.

One class serves both ``threadsafe=True`` and ``False``: ``__init__`` picks the lock (or none),
and each public method takes it if there is one. No class is chosen at construction time, so
the same source is the pure-Python reference and what mypyc compiles (``ttlstore.compiled``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    ItemsView,
    Iterator,
    KeysView,
    ValuesView,
)
from typing import Any, SupportsFloat, TypeVar, overload

from ttlstore._checks import positive_int, ttl_or_none
from ttlstore._core import MISSING, StoreCore
from ttlstore._slot import Slot
from ttlstore._types import (
    DEFAULT_TTL,
    RemovalCause,
    RemovalListener,
    StoreDefault,
    StoreStats,
)
from ttlstore._views import StoreItemsView, StoreValuesView

__all__ = [
    "DEFAULT_TTL",
    "RemovalCause",
    "RemovalListener",
    "Slot",
    "StoreDefault",
    "StoreStats",
    "TTLStore",
]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")
R = TypeVar("R")

_ASYNC_FACTORY = (
    "get_or_set() needs a plain factory, but {factory!r} returned an awaitable ({value!r}); "
    "for an async factory use `await ttlstore.memo.aget_or_set(store, key, factory)`"
)


class TTLStore(StoreCore[K, V]):
    """A bounded mapping whose entries expire after a TTL and are evicted least recently used.

    ``len(store) <= maxsize`` always; with ``weigher``, the total weight stays ``<= maxweight``.
    An entry at or past its deadline is invisible to every method, reclaimed or not.

    :param maxsize: the most entries held at once (a positive int).
    :param ttl: default seconds an entry lives after it is written; ``None`` for no expiry.
    :param sliding: a successful read renews the entry's deadline (time-to-idle); needs ``ttl``.
    :param maxweight: bound on the sum of ``weigher(key, value)`` over all entries.
    :param weigher: the weight of one entry, a non-negative number; needs ``maxweight``.
    :param clock: seconds as a float from a monotonic source; inject a fake one in tests.
    :param on_remove: called as ``on_remove(key, value, cause)`` for every removal, after the
        store's lock is released; an exception in it is logged on logger ``ttlstore``.
    :param threadsafe: every public method is atomic under one lock (also without a GIL).
        ``False`` drops the lock, for use from one thread or one event loop.

    TTLStore is final (its compiled build cannot be subclassed): wrap it instead.
    """

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The compiled build refuses subclasses; the pure one says so too, so both behave alike.
        raise TypeError("TTLStore is not designed for subclassing; wrap it instead")

    def __init__(
        self,
        maxsize: int,
        ttl: SupportsFloat | None = None,
        *,
        sliding: bool = False,
        maxweight: float | None = None,
        weigher: Callable[[K, V], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_remove: RemovalListener[K, V] | None = None,
        threadsafe: bool = True,
    ) -> None:
        maxsize = positive_int("maxsize", maxsize)
        seconds = ttl_or_none("ttl", ttl)
        if sliding and seconds is None:
            raise ValueError(
                f"sliding={sliding!r} needs a ttl to renew (got ttl=None): give ttl=seconds, "
                "or per-entry TTLs with set(..., ttl=...) and no sliding"
            )
        if (weigher is None) != (maxweight is None):
            raise ValueError(
                f"weigher and maxweight go together, got weigher={weigher!r}, "
                f"maxweight={maxweight!r}"
            )
        if maxweight is not None:
            if isinstance(maxweight, bool) or not isinstance(maxweight, (int, float)):
                raise TypeError(f"maxweight must be a positive number, got {maxweight!r}")
            if not maxweight > 0:
                raise ValueError(f"maxweight must be a positive number, got {maxweight!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        if on_remove is not None and not callable(on_remove):
            raise TypeError(f"on_remove must be callable or None, got {on_remove!r}")
        if not isinstance(threadsafe, bool):
            raise TypeError(f"threadsafe must be a bool, got {threadsafe!r}")
        super().__init__(
            maxsize, seconds, bool(sliding), maxweight, weigher, clock, on_remove, threadsafe
        )

    # ------------------------------------------------------------------ hot reads

    def get(self, key: K, default: D | None = None) -> V | D | None:  # type: ignore[override]
        """Return the value of ``key``, or ``default`` if absent or expired. O(1).

        A hit moves the key to the most recently used end (and, with ``sliding``, renews its
        deadline); it counts as a hit or a miss in :meth:`stats`.
        """
        # The body is written twice, without and with the lock: one shared body would cost
        # the unlocked read a lock test and a try/finally (+25-33 ns on a 168 ns hit, measured
        # in /tmp microbenchmarks of this method; the locked read is unaffected).
        lock = self._lock
        if lock is None:
            entry = self._lookup(key)
            if entry is not None:
                now = self._clock()
                if entry.deadline > now:
                    self._to_end(key)
                    self._hits += 1
                    if self._sliding and entry.ttl is not None and now + entry.ttl > entry.deadline:
                        entry.deadline = now + entry.ttl
                    return entry.value
                self._drop_expired(entry)
                self._misses += 1
                if self._pending:
                    self._flush()
                return default
            self._misses += 1
            return default
        lock.acquire()
        try:
            entry = self._lookup(key)
            if entry is not None:
                now = self._clock()
                if entry.deadline > now:
                    self._to_end(key)
                    self._hits += 1
                    if self._sliding and entry.ttl is not None and now + entry.ttl > entry.deadline:
                        # Never earlier (a clock stepping back): the index item must stay due
                        # no later than the entry.
                        entry.deadline = now + entry.ttl
                    return entry.value
                self._drop_expired(entry)
            self._misses += 1
        finally:
            lock.release()
        # Only a miss can have queued a removal (an expired entry): hits skip this check.
        if self._pending:
            self._flush()
        return default

    def __getitem__(self, key: K) -> V:
        """Return the value of ``key`` as :meth:`get` does; ``KeyError`` if absent. O(1)."""
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value  # type: ignore[return-value]

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` holds a live entry; touches neither recency nor stats. O(1)."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            entry = self._lookup(key)  # type: ignore[arg-type]
            return entry is not None and entry.deadline > self._clock()
        finally:
            if lock is not None:
                lock.release()

    def peek(self, key: K, default: D | None = None) -> V | D | None:
        """Return the value of ``key`` without touching recency, deadline or stats. O(1)."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            entry = self._lookup(key)
            if entry is not None and entry.deadline > self._clock():
                return entry.value
            return default
        finally:
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ writes

    def set(self, key: K, value: V, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL) -> None:
        """Store ``value`` under ``key``, as the most recently used entry.

        ``ttl`` overrides the store's default for this entry; ``None`` means no expiry. When the
        store is full, due entries are reclaimed first (as many as needed to make room), then
        the least recently used live ones are evicted. O(1) amortized with the default TTL,
        O(log n) with another TTL.
        """
        ttl = self._ttl if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        weight = 0.0 if self._weigher is None else self._weigh(key, value)
        # _set() called directly rather than through _run(), and without a try/finally when
        # unlocked: this is a hot path.
        lock = self._lock
        if lock is None:
            self._set(key, value, ttl, weight, False)
        else:
            lock.acquire()
            try:
                self._set(key, value, ttl, weight, False)
            finally:
                lock.release()
        if self._pending:
            self._flush()

    def __setitem__(self, key: K, value: V) -> None:
        """Store ``value`` under ``key`` with the default TTL, as :meth:`set` does."""
        weight = 0.0 if self._weigher is None else self._weigh(key, value)
        lock = self._lock
        if lock is None:
            self._set(key, value, self._ttl, weight, False)
        else:
            lock.acquire()
            try:
                self._set(key, value, self._ttl, weight, False)
            finally:
                lock.release()
        if self._pending:
            self._flush()

    def add(self, key: K, value: V, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL) -> bool:
        """Store ``value`` only if ``key`` holds no live entry; return whether it did.

        Complexity as :meth:`set`.
        """
        ttl = self._ttl if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        return self._run(self._set, key, value, ttl, self._weigh(key, value), True)

    def setdefault(
        self,
        key: K,
        default: V = None,  # type: ignore[assignment]
        ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
    ) -> V:
        """Return the live value of ``key`` (a read), or store and return ``default``.

        Complexity as :meth:`set`.
        """
        ttl = self._ttl if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        return self._run(self._setdefault, key, default, ttl, self._weigh(key, default))

    def update(self, *args: Any, **kwargs: V) -> None:
        """Store many items with the default TTL, all or none (checks run before any write).

        O(m) amortized for m items.
        """
        items = list(dict(*args, **kwargs).items())
        weights = [self._weigh(key, value) for key, value in items]
        self._run(self._update, items, weights)

    def compute(self, key: K, fn: Callable[[Slot[K, V]], R]) -> R:
        """Read, decide and write or remove ``key`` atomically; return what ``fn`` returns.

        ``fn(slot)`` sees the key's live entry, if any (``slot.found``, ``slot.value``) and may
        ask for a write (``slot.set(value, ttl=...)`` or ``deadline=...``) or a removal
        (``slot.remove()``), done when ``fn`` returns. It all happens under one lock hold:
        no other call on the store lands between the read and the write. The call counts as
        a read (a hit, with recency and ``sliding`` as :meth:`get`, or a miss) and then as
        the write or removal asked for; removal callbacks run after the lock is released.
        If ``fn`` raises, nothing is changed or counted and the exception propagates.

        ``fn`` runs while the store's lock is held, so it must not call this store (a
        thread-safe store would deadlock); with a ``weigher``, the weigher runs there too.
        O(1) plus ``fn``, or as :meth:`set` when it writes.
        """
        # _run() written out: this is the rate limiter's hot path.
        lock = self._lock
        if lock is None:
            result = self._compute(key, fn)
        else:
            lock.acquire()
            try:
                result = self._compute(key, fn)
            finally:
                lock.release()
        if self._pending:
            self._flush()
        return result

    def __delitem__(self, key: K) -> None:
        """Remove ``key`` (cause ``DELETED``); ``KeyError`` if absent or expired. O(1)."""
        if self._run(self._pop, key, MISSING) is MISSING:
            raise KeyError(key)

    @overload
    def pop(self, key: K) -> V: ...
    @overload
    def pop(self, key: K, default: V) -> V: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...
    def pop(self, key: K, default: Any = MISSING) -> Any:
        """Remove ``key`` and return its value (cause ``DELETED``), else ``default``. O(1).

        Without ``default``, an absent or expired key raises ``KeyError``.
        """
        value = self._run(self._pop, key, default)
        if value is MISSING:
            raise KeyError(key)
        return value

    def popitem(self) -> tuple[K, V]:
        """Remove and return the least recently used live item (cause ``DELETED``).

        ``KeyError`` if the store holds no live entry. O(1) amortized.
        """
        self._reclaim_backlog()
        item = self._run(self._popitem)
        if item is None:
            raise KeyError("popitem(): store is empty")
        return item

    def touch(self, key: K, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL) -> bool:
        """Renew the deadline of a live ``key`` to now + ``ttl`` and mark it most recently used.

        Without ``ttl`` the entry's own TTL is renewed. Returns whether ``key`` was live.
        O(1) when the deadline moves later, O(log n) when it moves earlier.
        """
        new_ttl = DEFAULT_TTL if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        return self._run(self._touch, key, new_ttl)

    def ttl(self, key: K) -> float | None:
        """Seconds left before ``key`` expires, ``None`` if it never does. O(1).

        ``KeyError`` if ``key`` is absent or expired. Touches neither recency nor stats.
        """
        return self._run(self._remaining, key)

    def expire(self, limit: int | None = None) -> int:
        """Reclaim up to ``limit`` due entries now (all if ``None``); return how many.

        Each counts as an expiration and is reported with cause ``EXPIRED``. O(k) for k
        default-TTL entries, O(k log n) for entries with their own TTL.
        """
        if limit is not None:
            positive_int("limit", limit)
        return self._run(self._expire, limit)

    def get_or_set(
        self,
        key: K,
        factory: Callable[[], V],
        ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
    ) -> V:
        """Return the live value of ``key``, or compute it once with ``factory()`` and store it.

        Concurrent callers of a missing key wait for one factory call and share its result; if
        it raises, every one of them gets the exception and nothing is stored. A factory that
        asks for its own key raises ``RuntimeError`` rather than deadlock. A factory that
        returns an awaitable (an ``async def`` one) raises ``TypeError``: an async factory
        needs ``ttlstore.memo.aget_or_set``. O(1) plus the one factory call; waiters block
        until it returns.
        """
        ttl = self._ttl if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        found, flight, owner = self._run(self._claim, key)
        if flight is None:
            return found  # type: ignore[return-value]
        if not owner:
            if flight.owner == threading.get_ident():
                raise RuntimeError(f"get_or_set factory for {key!r} asked for its own key")
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value  # type: ignore[no-any-return]
        try:
            value = factory()
            if isinstance(value, Awaitable):
                if isinstance(value, Coroutine):
                    value.close()  # never awaited by anyone: close it, so no warning leaks
                raise TypeError(_ASYNC_FACTORY.format(factory=factory, value=value))
            self._run(self._set, key, value, ttl, self._weigh(key, value), False)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            return value
        finally:
            self._run(self._land, key, flight)
            flight.done.set()

    def clear(self) -> None:
        """Remove every entry: live ones with cause ``DELETED``, due ones ``EXPIRED``. O(n)."""
        self._run(self._clear)

    # ------------------------------------------------------------------ observers

    def stats(self) -> StoreStats:
        """An immutable snapshot of the counters, taken at one instant. Reclaims nothing.

        ``size`` is :meth:`live_count`; polling ``stats()`` (a dashboard, a metrics scrape)
        therefore leaves due entries to the sweeper, whose counters stay meaningful. Cost as
        :meth:`live_count`.
        """
        return self._run(self._stats)

    def live_count(self) -> int:
        """Number of live entries, counted without reclaiming due ones or calling back.

        Exact (equal to ``len(store)`` at the same instant) and side-effect free: for metrics
        and health checks. O(1) when nothing is due, O(k) for k due entries not yet reclaimed
        (a sweeper keeps k small).
        """
        return self._run(self._live_count)

    @property
    def maxsize(self) -> int:
        """The most entries the store holds."""
        return self._maxsize

    @property
    def threadsafe(self) -> bool:
        """Whether every public method runs under the store's lock."""
        return self._lock is not None

    @property
    def default_ttl(self) -> float | None:
        """The TTL of entries written without one, ``None`` for no expiry."""
        return self._ttl

    def __len__(self) -> int:
        """Number of live entries, after reclaiming due ones. O(1) amortized.

        This reclaims (and calls back for) due entries; :meth:`live_count` counts the same
        without touching anything.
        """
        self._reclaim_backlog()
        return self._run(self._live_len)

    def __iter__(self) -> Iterator[K]:
        """Iterate over a snapshot of the live keys, least recently used first. O(n).

        The snapshot is taken at one instant, so it never disagrees with ``len`` at that
        instant, and later writes never break the iteration. Reclaims due entries first.
        """
        self._reclaim_backlog()
        return iter(self._run(self._snapshot_keys))

    def keys(self) -> KeysView[K]:
        """A view of the live keys; iteration takes a snapshot. O(1), O(n) to iterate."""
        return KeysView(self)

    def items(self) -> ItemsView[K, V]:
        """A view of the live items, iterated from a snapshot without touching recency.

        O(1), O(n) to iterate; ``(k, v) in items`` is O(1).
        """
        return StoreItemsView(self, self._snapshot_items, self.peek)

    def values(self) -> ValuesView[V]:
        """A view of the live values, iterated from a snapshot without touching recency.

        O(1), O(n) to iterate or to test membership.
        """
        return StoreValuesView(self, self._snapshot_items)

    def _snapshot_items(self) -> list[tuple[K, V]]:
        """Every live (key, value) pair at one instant, LRU first. O(n)."""
        self._reclaim_backlog()
        return self._run(self._items_now)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A shallow copy would share the entries, the index and the lock with this store.
        raise TypeError(
            "TTLStore cannot be copied or pickled; make a new store and update() it from "
            "this one's items()"
        )

    def __repr__(self) -> str:
        # Counts what is stored, due entries included: repr must not reclaim or call back.
        ttl = "None" if self._ttl is None else f"{self._ttl:g}"
        return (
            f"<TTLStore stored={len(self._data)} maxsize={self._maxsize} ttl={ttl} "
            f"sliding={self._sliding} threadsafe={self.threadsafe}>"
        )
