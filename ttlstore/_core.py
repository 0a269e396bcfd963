"""StoreCore: the state of a TTLStore and every method of it but the constructor.

:class:`~ttlstore.store.TTLStore` is this class plus argument checks, weak-reference support
and the ``MutableMapping`` mixins; it stays interpreted in every build, so its signature is the
real one in ``help()``. This class, the steps in :mod:`ttlstore._steps`, :mod:`ttlstore._writes`
and :mod:`ttlstore._flights` and the index are what mypyc compiles. Every method takes the lock
(if any) itself and runs its steps under it. The interpreted build replaces the hottest methods
with the bodies in :mod:`ttlstore._interpreted`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, SupportsFloat, TypeAlias, TypeVar

from ttlstore._checks import positive_int, ttl_or_none
from ttlstore._deadlines import INF, DeadlineIndex, Entry
from ttlstore._flights import Flight, single_flight
from ttlstore._mypyc import mypyc_attr
from ttlstore._slot import Slot
from ttlstore._slot_core import Plan, SlotCore
from ttlstore._steps import (
    MISSING,
    Lock,
    do_clear,
    do_pop,
    do_popitem,
    drop_expired,
    expire_due,
    flush,
    items_now,
    live_count,
    live_len,
    read,
    reclaim_backlog,
    remaining,
    run,
    snapshot_keys,
    snapshot_stats,
    weigh,
)
from ttlstore._types import DEFAULT_TTL, RemovalCause, RemovalListener, StoreDefault, StoreStats
from ttlstore._writes import do_setdefault, do_touch, do_update, locked_compute, write

__all__ = ["StoreCore"]

# Keys and values as the compiled core sees them. The core is not Generic: mypyc gives a
# Generic class a __dict__ and a weak-reference slot, which costs every entry 16 bytes and
# which CPython 3.11's collector mis-traverses (a weak reference to such an object crashed it).
# TTLStore declares the typed API.
K: TypeAlias = Any
V: TypeAlias = Any
D = TypeVar("D")
R = TypeVar("R")


# An interpreted subclass (TTLStore) adds what a compiled class cannot have safely: a weak
# reference slot (mypyc's own one is mis-traversed by the garbage collector on CPython 3.11).
@mypyc_attr(allow_interpreted_subclasses=True)
class StoreCore:
    """State and methods of a TTLStore; see :class:`~ttlstore.store.TTLStore`."""

    __slots__ = (
        "_clock",
        "_data",
        "_deletions",
        "_evictions",
        "_expirations",
        "_flights",
        "_hits",
        "_index",
        "_lock",
        "_lookup",
        "_maxsize",
        "_maxweight",
        "_misses",
        "_on_remove",
        "_pending",
        "_plan",
        "_replacements",
        "_sliding",
        "_slot",
        "_to_end",
        "_ttl",
        "_weighed",
        "_weigher",
        "_weight",
        "_writes",
    )

    def __init__(
        self,
        maxsize: int,
        ttl: float | None,
        sliding: bool,
        maxweight: float | None,
        weigher: Callable[[K, V], object] | None,
        clock: Callable[[], float],
        on_remove: RemovalListener[K, V] | None,
        threadsafe: bool,
    ) -> None:
        """Set up an empty store from arguments already checked by TTLStore."""
        self._maxsize = maxsize
        self._ttl = ttl
        self._lock: Lock | None = threading.Lock() if threadsafe else None
        self._sliding = sliding
        self._maxweight: float = INF if maxweight is None else float(maxweight)
        self._weigher = weigher
        self._weighed: dict[K, float] = {}
        self._weight = 0.0
        self._clock = clock
        self._on_remove = on_remove
        self._pending: list[tuple[K, V, RemovalCause]] = []
        self._data: OrderedDict[K, Entry] = OrderedDict()
        # Bound once: the hot reads save an attribute lookup each. _data is therefore never
        # replaced, only cleared in place.
        self._lookup = self._data.get
        self._to_end = self._data.move_to_end
        self._index: DeadlineIndex = DeadlineIndex(ttl)
        self._flights: dict[K, Flight] = {}
        # Reused by every compute() (see ttlstore._slot_core): one call at a time holds the lock.
        self._plan = Plan()
        # Typed as the compiled half, whose fields compiled code then reads natively.
        self._slot: SlotCore = Slot(self._plan)
        self._hits = self._misses = self._writes = 0
        self._expirations = self._evictions = self._deletions = self._replacements = 0

    # ------------------------------------------------------------------ hot reads

    def get(self, key: K, default: D | None = None) -> V | D | None:
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
                drop_expired(self, entry)
                self._misses += 1
                if self._pending:
                    flush(self)
                return default
            self._misses += 1
            return default
        result: Any = default
        lock.acquire()
        # No return inside the try: compiled, a return through a finally costs more than the
        # rest of a hit (mypyc saves and restores the error state around it).
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
                    result = entry.value
                else:
                    drop_expired(self, entry)
                    self._misses += 1
            else:
                self._misses += 1
        finally:
            lock.release()
        # Only a miss can have queued a removal (an expired entry).
        if self._pending:
            flush(self)
        return result

    def __getitem__(self, key: K) -> V:
        """Return the value of ``key`` as :meth:`get` does; ``KeyError`` if absent. O(1)."""
        value = read(self, key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        found: V = value
        return found

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` holds a live entry; touches neither recency nor stats. O(1)."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            entry = self._lookup(key)
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
        weight = 0.0 if self._weigher is None else weigh(self, key, value)
        # _set() called directly rather than through _run(), and without a try/finally when
        # unlocked: this is a hot path.
        lock = self._lock
        if lock is None:
            write(self, key, value, ttl, weight, False)
        else:
            lock.acquire()
            try:
                write(self, key, value, ttl, weight, False)
            finally:
                lock.release()
        if self._pending:
            flush(self)

    def __setitem__(self, key: K, value: V) -> None:
        """Store ``value`` under ``key`` with the default TTL, as :meth:`set` does."""
        weight = 0.0 if self._weigher is None else weigh(self, key, value)
        lock = self._lock
        if lock is None:
            write(self, key, value, self._ttl, weight, False)
        else:
            lock.acquire()
            try:
                write(self, key, value, self._ttl, weight, False)
            finally:
                lock.release()
        if self._pending:
            flush(self)

    def add(self, key: K, value: V, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL) -> bool:
        """Store ``value`` only if ``key`` holds no live entry; return whether it did.

        Complexity as :meth:`set`.
        """
        ttl = self._ttl if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        return run(self, write, key, value, ttl, weigh(self, key, value), True)

    def setdefault(
        self,
        key: K,
        default: V = None,
        ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
    ) -> V:
        """Return the live value of ``key`` (a read), or store and return ``default``.

        Complexity as :meth:`set`.
        """
        ttl = self._ttl if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        value: V = run(self, do_setdefault, key, default, ttl, weigh(self, key, default))
        return value

    def update(self, *args: Any, **kwargs: V) -> None:
        """Store many items with the default TTL, all or none (checks run before any write).

        O(m) amortized for m items.
        """
        items = list(dict(*args, **kwargs).items())
        weights = [weigh(self, key, value) for key, value in items]
        run(self, do_update, items, weights)

    def compute(self, key: K, fn: Callable[[Slot[Any, Any]], R]) -> R:
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
        return locked_compute(self, key, fn)

    def __delitem__(self, key: K) -> None:
        """Remove ``key`` (cause ``DELETED``); ``KeyError`` if absent or expired. O(1)."""
        if run(self, do_pop, key, MISSING) is MISSING:
            raise KeyError(key)

    def pop(self, key: K, default: Any = MISSING) -> Any:
        """Remove ``key`` and return its value (cause ``DELETED``), else ``default``. O(1).

        Without ``default``, an absent or expired key raises ``KeyError``.
        """
        value = run(self, do_pop, key, default)
        if value is MISSING:
            raise KeyError(key)
        return value

    def popitem(self) -> tuple[K, V]:
        """Remove and return the least recently used live item (cause ``DELETED``).

        ``KeyError`` if the store holds no live entry. O(1) amortized.
        """
        reclaim_backlog(self)
        item = run(self, do_popitem)
        if item is None:
            raise KeyError("popitem(): store is empty")
        return item

    def touch(self, key: K, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL) -> bool:
        """Renew the deadline of a live ``key`` to now + ``ttl`` and mark it most recently used.

        Without ``ttl`` the entry's own TTL is renewed. Returns whether ``key`` was live.
        O(1) when the deadline moves later, O(log n) when it moves earlier.
        """
        new_ttl = DEFAULT_TTL if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
        return run(self, do_touch, key, new_ttl)

    def ttl(self, key: K) -> float | None:
        """Seconds left before ``key`` expires, ``None`` if it never does. O(1).

        ``KeyError`` if ``key`` is absent or expired. Touches neither recency nor stats.
        """
        return run(self, remaining, key)

    def expire(self, limit: object = None) -> int:
        """Reclaim up to ``limit`` due entries now (all if ``None``); return how many.

        Each counts as an expiration and is reported with cause ``EXPIRED``. O(k) for k
        default-TTL entries, O(k log n) for entries with their own TTL.
        """
        if limit is not None:
            limit = positive_int("limit", limit)
        return run(self, expire_due, limit)

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
        value: V = single_flight(self, key, factory, ttl)
        return value

    def clear(self) -> None:
        """Remove every entry: live ones with cause ``DELETED``, due ones ``EXPIRED``. O(n)."""
        run(self, do_clear)

    # ------------------------------------------------------------------ observers

    def stats(self) -> StoreStats:
        """An immutable snapshot of the counters, taken at one instant. Reclaims nothing.

        ``size`` is :meth:`live_count`; polling ``stats()`` (a dashboard, a metrics scrape)
        therefore leaves due entries to the sweeper, whose counters stay meaningful. Cost as
        :meth:`live_count`.
        """
        return run(self, snapshot_stats)

    def live_count(self) -> int:
        """Number of live entries, counted without reclaiming due ones or calling back.

        Exact (equal to ``len(store)`` at the same instant) and side-effect free: for metrics
        and health checks. O(1) when nothing is due, O(k) for k due entries not yet reclaimed
        (a sweeper keeps k small).
        """
        return run(self, live_count)

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
        reclaim_backlog(self)
        return run(self, live_len)

    def __iter__(self) -> Iterator[K]:
        """Iterate over a snapshot of the live keys, least recently used first. O(n).

        The snapshot is taken at one instant, so it never disagrees with ``len`` at that
        instant, and later writes never break the iteration. Reclaims due entries first.
        """
        reclaim_backlog(self)
        return iter(run(self, snapshot_keys))

    def _snapshot_items(self) -> list[tuple[K, V]]:
        """Every live (key, value) pair at one instant, LRU first. O(n)."""
        reclaim_backlog(self)
        return run(self, items_now)

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
