"""TTLStore: a bounded mapping with per-entry TTL, LRU eviction and removal callbacks.

Layout: an ``OrderedDict`` from key to one small :class:`~ttlstore._deadlines.Entry` keeps the
recency order (least recently used first), and a :class:`~ttlstore._deadlines.DeadlineIndex`
finds due entries without scanning. Reads check the entry's own deadline, so the index only
decides *when memory is reclaimed*, never what is visible.

One class serves both ``threadsafe=True`` and ``False``: ``__init__`` picks the lock (or none),
and each public method takes it if there is one. No class is chosen at construction time, so
the same source is the pure-Python reference and what mypyc compiles (ttlstore.compiled).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    ItemsView,
    Iterator,
    KeysView,
    MutableMapping,
    ValuesView,
)
from dataclasses import dataclass
from types import FunctionType
from typing import Any, Final, Generic, Protocol, SupportsFloat, TypeVar, overload

from ttlstore._checks import finite_seconds, positive_int, ttl_or_none
from ttlstore._deadlines import INF, DeadlineIndex, Entry

__all__ = ["RemovalCause", "Slot", "StoreStats", "TTLStore"]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")
R = TypeVar("R")

logger = logging.getLogger("ttlstore")


class RemovalCause(enum.Enum):
    """Why an entry left the store, as passed to ``on_remove``."""

    EXPIRED = "expired"
    """Its deadline passed."""
    EVICTED = "evicted"
    """It made room under ``maxsize`` or ``maxweight``."""
    DELETED = "deleted"
    """Removed explicitly: ``del``, ``pop``, ``popitem``, ``clear``, ``Slot.remove``."""
    REPLACED = "replaced"
    """Overwritten by a write to the same key."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """An immutable snapshot of a store's counters, taken without reclaiming anything."""

    hits: int
    misses: int
    writes: int
    expirations: int
    evictions: int
    deletions: int
    replacements: int
    size: int
    """Live entries (due ones not yet reclaimed are not counted)."""
    weight: float
    """Total weight stored (due entries not yet reclaimed still count against ``maxweight``)."""


class _Unset(enum.Enum):
    """Marker for "argument not given": ``ttl=None`` already means "no expiry"."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "<store default>"


UNSET = _Unset.UNSET
_MISSING: Any = object()

_new_entry = Entry.__new__
# Whether Entry is an interpreted class (not compiled by mypyc), which _set() builds without
# calling its constructor.
_PURE: Final = isinstance(Entry.__init__, FunctionType)

# Due entries reclaimed per lock hold when len(), iteration or popitem() meet a backlog.
_BACKLOG_SLICE = 1024

# What a Slot asks compute() to do once its function has returned.
_KEEP, _WRITE, _REMOVE = 0, 1, 2

_ASYNC_FACTORY = (
    "get_or_set() needs a plain factory, but {factory!r} returned an awaitable ({value!r}); "
    "for an async factory use `await ttlstore.memo.aget_or_set(store, key, factory)`"
)

RemovalListener = Callable[[K, V, RemovalCause], object]


class _Lock(Protocol):
    """What the store needs of its lock (``threading.Lock``; tests put a spy in its place)."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...


class _Flight:
    """One get_or_set() factory call in progress, which other callers of the key wait on."""

    __slots__ = ("done", "error", "owner", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.owner = threading.get_ident()
        self.value: Any = None
        self.error: BaseException | None = None


class _Plan:
    """What a compute() function asked for: filled in through its Slot, read by the store."""

    __slots__ = ("deadline", "done", "op", "ttl", "value")

    def __init__(self) -> None:
        self.op = _KEEP
        self.done = False
        self.value: Any = None
        self.ttl: float | _Unset | None = UNSET
        self.deadline: float | None = None


class Slot(Generic[K, V]):
    """One key of a store as :meth:`TTLStore.compute` shows it to its function.

    ``found`` tells whether the key holds a live entry and ``value`` is its value (a
    ``KeyError`` when not found). :meth:`set` and :meth:`remove` say what to do once the
    function returns; the last call wins, and nothing is done if the function raises. ``now``
    is the store's clock reading for this call, for computing a ``deadline``.
    """

    __slots__ = ("_plan", "_value", "found", "key", "now")

    def __init__(self, key: K, found: bool, value: Any, now: float, plan: _Plan) -> None:
        self.key = key
        self.found = found
        self._value = value
        self.now = now
        self._plan = plan

    @property
    def value(self) -> V:
        """The live value; ``KeyError`` if the key holds none."""
        if not self.found:
            raise KeyError(self.key)
        return self._value  # type: ignore[no-any-return]

    def get(self, default: D | None = None) -> V | D | None:
        """The live value, or ``default`` if the key holds none."""
        return self._value if self.found else default

    def set(
        self,
        value: V,
        ttl: SupportsFloat | _Unset | None = UNSET,
        *,
        deadline: SupportsFloat | None = None,
    ) -> None:
        """Store ``value`` when the function returns, as the most recently used entry.

        ``ttl`` as in :meth:`TTLStore.set` (omitted: the store's default, ``None``: no
        expiry), or ``deadline``: an absolute instant on the store's clock (see :attr:`now`).
        A deadline already passed stores nothing and removes a live entry as expired.
        """
        plan = self._plan
        self._check_open(plan)
        checked_ttl: float | _Unset | None = UNSET
        checked_deadline: float | None = None
        if deadline is not None:
            if ttl is not UNSET:
                raise TypeError(f"give ttl or deadline, not both (got ttl={ttl!r})")
            checked_deadline = finite_seconds("deadline", deadline)
        elif ttl is not UNSET:
            checked_ttl = ttl_or_none("ttl", ttl)
        plan.op = _WRITE
        plan.value = value
        plan.ttl = checked_ttl
        plan.deadline = checked_deadline

    def remove(self) -> None:
        """Remove the live entry when the function returns (cause ``DELETED``)."""
        self._check_open(self._plan)
        self._plan.op = _REMOVE

    def _check_open(self, plan: _Plan) -> None:
        if plan.done:
            raise RuntimeError(f"the Slot of {self.key!r} was used after compute() returned")

    def __repr__(self) -> str:
        held = f"value={self._value!r}" if self.found else "absent"
        return f"<Slot {self.key!r} {held}>"


class TTLStore(MutableMapping[K, V]):
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

    __slots__ = (
        "__weakref__",
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
        "_replacements",
        "_sliding",
        "_to_end",
        "_ttl",
        "_weighed",
        "_weigher",
        "_weight",
        "_writes",
    )

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
        self._maxsize = positive_int("maxsize", maxsize)
        self._ttl = ttl_or_none("ttl", ttl)
        if sliding and self._ttl is None:
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
        self._lock: _Lock | None = threading.Lock() if threadsafe else None
        self._sliding = bool(sliding)
        self._maxweight: float = INF if maxweight is None else float(maxweight)
        self._weigher = weigher
        self._weighed: dict[K, float] = {}
        self._weight = 0.0
        self._clock = clock
        self._on_remove = on_remove
        self._pending: list[tuple[K, V, RemovalCause]] = []
        self._data: OrderedDict[K, Entry[K, V]] = OrderedDict()
        # Bound once: the hot reads save an attribute lookup each. _data is therefore never
        # replaced, only cleared in place.
        self._lookup = self._data.get
        self._to_end = self._data.move_to_end
        self._index: DeadlineIndex[K, V] = DeadlineIndex(self._ttl)
        self._flights: dict[K, _Flight] = {}
        self._hits = self._misses = self._writes = 0
        self._expirations = self._evictions = self._deletions = self._replacements = 0

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
        value = self.get(key, _MISSING)
        if value is _MISSING:
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

    def set(self, key: K, value: V, ttl: SupportsFloat | _Unset | None = UNSET) -> None:
        """Store ``value`` under ``key``, as the most recently used entry.

        ``ttl`` overrides the store's default for this entry; ``None`` means no expiry. When the
        store is full, due entries are reclaimed first (as many as needed to make room), then
        the least recently used live ones are evicted. O(1) amortized with the default TTL,
        O(log n) with another TTL.
        """
        ttl = self._ttl if ttl is UNSET else ttl_or_none("ttl", ttl)
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

    def add(self, key: K, value: V, ttl: SupportsFloat | _Unset | None = UNSET) -> bool:
        """Store ``value`` only if ``key`` holds no live entry; return whether it did.

        Complexity as :meth:`set`.
        """
        ttl = self._ttl if ttl is UNSET else ttl_or_none("ttl", ttl)
        return self._run(self._set, key, value, ttl, self._weigh(key, value), True)

    def setdefault(
        self,
        key: K,
        default: V = None,  # type: ignore[assignment]
        ttl: SupportsFloat | _Unset | None = UNSET,
    ) -> V:
        """Return the live value of ``key`` (a read), or store and return ``default``.

        Complexity as :meth:`set`.
        """
        ttl = self._ttl if ttl is UNSET else ttl_or_none("ttl", ttl)
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
        result: R = self._run(self._compute, key, fn)
        return result

    def __delitem__(self, key: K) -> None:
        """Remove ``key`` (cause ``DELETED``); ``KeyError`` if absent or expired. O(1)."""
        if self._run(self._pop, key, _MISSING) is _MISSING:
            raise KeyError(key)

    @overload
    def pop(self, key: K) -> V: ...
    @overload
    def pop(self, key: K, default: V) -> V: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...
    def pop(self, key: K, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (cause ``DELETED``), else ``default``. O(1).

        Without ``default``, an absent or expired key raises ``KeyError``.
        """
        value = self._run(self._pop, key, default)
        if value is _MISSING:
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

    def touch(self, key: K, ttl: SupportsFloat | _Unset | None = UNSET) -> bool:
        """Renew the deadline of a live ``key`` to now + ``ttl`` and mark it most recently used.

        Without ``ttl`` the entry's own TTL is renewed. Returns whether ``key`` was live.
        O(1) when the deadline moves later, O(log n) when it moves earlier.
        """
        new_ttl = UNSET if ttl is UNSET else ttl_or_none("ttl", ttl)
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
        self, key: K, factory: Callable[[], V], ttl: SupportsFloat | _Unset | None = UNSET
    ) -> V:
        """Return the live value of ``key``, or compute it once with ``factory()`` and store it.

        Concurrent callers of a missing key wait for one factory call and share its result; if
        it raises, every one of them gets the exception and nothing is stored. A factory that
        asks for its own key raises ``RuntimeError`` rather than deadlock. A factory that
        returns an awaitable (an ``async def`` one) raises ``TypeError``: an async factory
        needs ``ttlstore.memo.aget_or_set``. O(1) plus the one factory call; waiters block
        until it returns.
        """
        ttl = self._ttl if ttl is UNSET else ttl_or_none("ttl", ttl)
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
        return _ItemsView(self, self._snapshot_items)

    def values(self) -> ValuesView[V]:
        """A view of the live values, iterated from a snapshot without touching recency.

        O(1), O(n) to iterate or to test membership.
        """
        return _ValuesView(self, self._snapshot_items)

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

    # ------------------------------------------------------------------ plumbing

    def _run(self, method: Callable[..., R], *args: Any) -> R:
        """Run ``method`` atomically (under the lock, if any), then deliver removal callbacks."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            return method(*args)
        finally:
            if lock is not None:
                lock.release()
            if self._pending:
                self._flush()

    def _flush(self) -> None:
        """Deliver queued removals to ``on_remove``, outside the lock."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        pending, self._pending = self._pending, []
        if lock is not None:
            lock.release()
        callback = self._on_remove
        assert callback is not None
        for key, value, cause in pending:
            try:
                callback(key, value, cause)
            except Exception:
                logger.exception("on_remove callback failed for key %r (%s)", key, cause.value)

    def _weigh(self, key: K, value: V) -> float:
        """The checked weight of an item, computed before any lock is taken (user code)."""
        weigher = self._weigher
        if weigher is None:
            return 0.0
        weight = weigher(key, value)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weigher must return a number, got {weight!r} for key {key!r}")
        if not weight >= 0:  # also rejects NaN
            raise ValueError(f"weight must be >= 0, got {weight!r} for key {key!r}")
        if weight > self._maxweight:
            raise ValueError(
                f"weight {weight!r} of key {key!r} exceeds maxweight {self._maxweight!r}"
            )
        return float(weight)

    def _removed(self, entry: Entry[K, V], cause: RemovalCause) -> None:
        """Account for ``entry`` having just left ``_data``."""
        if entry.filed is not None:
            self._index.discard(entry, self._data)
        if self._weigher is not None:
            self._weight -= self._weighed.pop(entry.key)
        if cause is RemovalCause.EXPIRED:
            self._expirations += 1
        elif cause is RemovalCause.EVICTED:
            self._evictions += 1
        elif cause is RemovalCause.DELETED:
            self._deletions += 1
        if self._on_remove is not None:
            self._pending.append((entry.key, entry.value, cause))

    def _drop_expired(self, entry: Entry[K, V]) -> None:
        """Remove an entry a read found past its deadline."""
        if self._data.get(entry.key) is entry:  # another thread may have been first
            del self._data[entry.key]
            self._removed(entry, RemovalCause.EXPIRED)

    def _expire(self, limit: int | None, now: float | None = None) -> int:
        due = self._index.pop_due(self._clock() if now is None else now, limit, self._data)
        if due:
            # The index already deleted them from _data; account for them in bulk.
            self._expirations += len(due)
            if self._weigher is not None:
                for entry in due:
                    self._weight -= self._weighed.pop(entry.key)
            if self._on_remove is not None:
                expired = RemovalCause.EXPIRED
                self._pending.extend((entry.key, entry.value, expired) for entry in due)
        return len(due)

    # ------------------------------------------------------------------ the write path

    def _set(
        self,
        key: K,
        value: V,
        ttl: float | None,
        weight: float,
        only_new: bool,
        at: float | None = None,
    ) -> bool:
        """Write ``key``, due ``ttl`` from now (or ``at``); the body of set/add/[]=/compute.

        Returns False, doing nothing, if ``only_new`` and the key is live. The steps: a live
        key is replaced in place; otherwise an expired entry of the key is dropped, room is
        made (a due entry reclaimed, else the LRU one evicted), and a new entry is filed.
        The replacement, the eviction and the FIFO filing are written out here rather than
        called: each call costs a write at capacity about 40 ns of 640 (see the figures at
        each step, measured with benchmarks/bench_store.py on CPython 3.11).
        """
        now = self._clock()
        deadline = (INF if ttl is None else now + ttl) if at is None else at
        data = self._data
        entry = data.get(key)
        if entry is not None and entry.deadline > now:
            if only_new:
                return False
            # Replace (inline: a _replace() call made set-update 13 % slower).
            data.move_to_end(key)
            if self._weigher is not None:
                # Count the new weight before making room, so the bound holds throughout.
                self._weight -= self._weighed[key]
                self._weighed[key] = 0.0
                self._shed_weight(now, weight, replacing=True)
            old_value = entry.value
            entry.ttl = ttl
            if entry.filed is not None and deadline >= entry.filed:
                # _redate()'s common case, written out.
                entry.value = value
                entry.deadline = deadline
            else:
                self._redate(entry, deadline, value)
            self._replacements += 1
            if self._on_remove is not None:
                self._pending.append((key, old_value, RemovalCause.REPLACED))
        else:
            if entry is not None:
                del data[key]
                self._removed(entry, RemovalCause.EXPIRED)
            if len(data) >= self._maxsize:
                # Make room (inline: a _make_room() call made set-evict N % slower).
                index = self._index
                fifo = index.fifo
                heap = index.heap
                if (fifo and fifo[0].filed <= now) or (heap and heap[0][0] <= now):  # type: ignore[operator]
                    # One due entry frees the one slot needed; the rest of a backlog is left
                    # to sweeps and reads, so a write never pays for more than it frees.
                    self._expire(1, now)
                while len(data) >= self._maxsize:
                    victim = data.popitem(False)[1]
                    if victim.filed is not None:
                        if fifo and fifo[0] is victim:
                            fifo.popleft()  # the common case: LRU and FIFO heads coincide
                        else:
                            index.discard(victim, data)
                    self._evictions += 1
                    if self._weigher is not None:
                        self._weight -= self._weighed.pop(victim.key)
                    if self._on_remove is not None:
                        self._pending.append((victim.key, victim.value, RemovalCause.EVICTED))
            if self._weigher is not None:
                self._shed_weight(now, weight, replacing=False)
            if _PURE:
                # Interpreted, a constructor call made set-evict 3-5 % slower (+40 ns, measured
                # interleaved against this path): build the entry without one. Compiled, the
                # constructor is a direct C call, and the only way mypyc builds an Entry.
                entry = _new_entry(Entry)
                entry.key = key
                entry.value = value
                entry.deadline = deadline
                entry.filed = None
                entry.ttl = ttl
            else:
                entry = Entry(key, value, deadline, ttl)
            data[key] = entry
            fifo = self._index.fifo
            # DeadlineIndex.file() written out for its common case (default TTL, in order).
            if ttl == self._ttl and deadline != INF and (not fifo or fifo[-1].filed <= deadline):  # type: ignore[operator]
                entry.filed = deadline
                fifo.append(entry)
            elif deadline != INF:
                self._index.file(entry)
        if self._weigher is not None:
            self._weighed[key] = weight
            self._weight += weight
        self._writes += 1
        return True

    def _redate(self, entry: Entry[K, V], deadline: float, value: V) -> None:
        """Give the live ``entry`` a new deadline and value, keeping the index exact.

        A later deadline is updated in place (O(1)): the old item is re-filed when it
        surfaces. An earlier one needs a fresh entry and index item (O(log n)).
        """
        if entry.filed is None or deadline >= entry.filed:
            entry.value = value
            entry.deadline = deadline
            if entry.filed is None and deadline != INF:
                self._index.file(entry)
        else:
            fresh = Entry(entry.key, value, deadline, entry.ttl)
            self._data[entry.key] = fresh
            self._index.discard(entry, self._data)
            self._index.file(fresh)

    def _shed_weight(self, now: float, weight: float, replacing: bool) -> None:
        """Reclaim due entries, then evict LRU ones, until ``weight`` more fits the bound.

        When ``replacing``, the entry being replaced sits at the MRU end with weight 0 by now
        and must never be its own victim: once it is the only one left, everything fits.
        """
        maxweight = self._maxweight
        # Due entries go first, one at a time: only as many as the new weight needs, so a
        # backlog of due entries costs this write no more than what it frees.
        while self._weight + weight > maxweight and self._expire(1, now):
            pass
        data = self._data
        last = 1 if replacing else 0
        while self._weight + weight > maxweight:
            if len(data) <= last:
                # Only float residue of many additions and subtractions is left over.
                self._weight = 0.0
                break
            self._removed(data.popitem(False)[1], RemovalCause.EVICTED)

    # ------------------------------------------------------------------ method bodies

    def _setdefault(self, key: K, default: V, ttl: float | None, weight: float) -> V:
        entry = self._live(key)
        if entry is not None:
            return self._hit(entry)
        self._set(key, default, ttl, weight, False)
        return default

    def _update(self, items: list[tuple[K, V]], weights: list[float]) -> None:
        for (key, value), weight in zip(items, weights, strict=True):
            self._set(key, value, self._ttl, weight, False)

    def _compute(self, key: K, fn: Callable[[Slot[K, V]], R]) -> R:
        entry = self._live(key)
        plan = _Plan()
        now = self._clock()
        value = None if entry is None else entry.value
        try:
            result = fn(Slot(key, entry is not None, value, now, plan))
        finally:
            plan.done = True
        # fn returned: weigh what it asked to write (may raise: nothing done yet), count the
        # read, then do what it asked for.
        op = plan.op
        weight = 0.0
        if op == _WRITE and self._weigher is not None:
            weight = self._weigh(key, plan.value)
        if entry is None:
            self._misses += 1
        else:
            self._hit(entry)
        if op == _WRITE:
            self._compute_write(key, plan, now, weight)
        elif op == _REMOVE and entry is not None:
            entry = self._data[key]  # _hit() may have renewed it, never replaced it
            del self._data[key]
            self._removed(entry, RemovalCause.DELETED)
        return result

    def _compute_write(self, key: K, plan: _Plan, now: float, weight: float) -> None:
        deadline = plan.deadline
        if deadline is None:
            ttl = self._ttl if plan.ttl is UNSET else plan.ttl
            self._set(key, plan.value, ttl, weight, False)
        elif deadline > now:
            # The entry's own TTL (what sliding and touch() renew) is the time it was given.
            self._set(key, plan.value, deadline - now, weight, False, deadline)
        else:
            entry = self._lookup(key)
            if entry is not None:
                del self._data[key]
                self._removed(entry, RemovalCause.EXPIRED)

    def _hit(self, entry: Entry[K, V]) -> V:
        """Count a read of a live entry: recency, sliding deadline, stats."""
        self._to_end(entry.key)
        self._hits += 1
        if self._sliding and entry.ttl is not None:
            entry.deadline = max(entry.deadline, self._clock() + entry.ttl)
        return entry.value

    def _live(self, key: K) -> Entry[K, V] | None:
        """The live entry of ``key``, reclaiming it if it is due."""
        entry = self._lookup(key)
        if entry is not None and entry.deadline <= self._clock():
            self._drop_expired(entry)
            return None
        return entry

    def _pop(self, key: K, default: Any) -> Any:
        entry = self._live(key)
        if entry is None:
            return default
        del self._data[key]
        self._removed(entry, RemovalCause.DELETED)
        return entry.value

    def _popitem(self) -> tuple[K, V] | None:
        self._expire(None)
        if not self._data:
            return None
        key, entry = self._data.popitem(False)
        self._removed(entry, RemovalCause.DELETED)
        return key, entry.value

    def _touch(self, key: K, ttl: float | _Unset | None) -> bool:
        entry = self._live(key)
        if entry is None:
            return False
        if ttl is not UNSET:
            entry.ttl = ttl
        self._to_end(key)
        self._redate(entry, INF if entry.ttl is None else self._clock() + entry.ttl, entry.value)
        return True

    def _remaining(self, key: K) -> float | None:
        entry = self._lookup(key)
        now = self._clock()
        if entry is None or entry.deadline <= now:
            raise KeyError(key)
        return None if entry.deadline == INF else entry.deadline - now

    def _claim(self, key: K) -> tuple[V | None, _Flight | None, bool]:
        """Look ``key`` up for get_or_set: (value, None, _) on a hit, else its flight."""
        entry = self._live(key)
        if entry is not None:
            return self._hit(entry), None, False
        self._misses += 1
        flight = self._flights.get(key)
        if flight is not None:
            return None, flight, False
        flight = self._flights[key] = _Flight()
        return None, flight, True

    def _land(self, key: K, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _clear(self) -> None:
        now = self._clock()
        entries = list(self._data.values())
        self._data.clear()
        self._index.clear()
        for entry in entries:
            entry.filed = None  # the index is already empty: nothing turns stale
            due = entry.deadline <= now
            self._removed(entry, RemovalCause.EXPIRED if due else RemovalCause.DELETED)
        self._weight = 0.0  # drop float residue

    def _stats(self) -> StoreStats:
        return StoreStats(
            hits=self._hits,
            misses=self._misses,
            writes=self._writes,
            expirations=self._expirations,
            evictions=self._evictions,
            deletions=self._deletions,
            replacements=self._replacements,
            size=self._live_count(),
            weight=self._weight,
        )

    def _live_count(self) -> int:
        return len(self._data) - self._index.count_due(self._clock(), self._data)

    def _live_len(self) -> int:
        self._expire(None)
        return len(self._data)

    def _snapshot_keys(self) -> list[K]:
        self._expire(None)
        return list(self._data)

    def _items_now(self) -> list[tuple[K, V]]:
        self._expire(None)
        return [(key, entry.value) for key, entry in self._data.items()]

    def _reclaim_backlog(self) -> None:
        """Reclaim due entries slice by slice, releasing the lock in between.

        Called before an operation that must reclaim every due entry under the lock (len,
        iteration, popitem), so that a large backlog never blocks other threads for longer
        than one slice; the operation itself then finds little left to do.
        """
        if self._lock is not None:
            while self._run(self._expire, _BACKLOG_SLICE) == _BACKLOG_SLICE:
                pass


class _ItemsView(ItemsView[K, V]):
    """Items of a TTLStore: iterated from an atomic snapshot, checked with ``peek``."""

    _mapping: TTLStore[K, V]

    def __init__(self, store: TTLStore[K, V], snapshot: Callable[[], list[tuple[K, V]]]) -> None:
        super().__init__(store)
        self._snapshot = snapshot

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return iter(self._snapshot())

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        found = self._mapping.peek(key, _MISSING)
        return found is not _MISSING and (found is value or found == value)


class _ValuesView(ValuesView[V]):
    """Values of a TTLStore: iterated from an atomic snapshot, touching no recency."""

    def __init__(
        self, store: TTLStore[Any, V], snapshot: Callable[[], list[tuple[Any, V]]]
    ) -> None:
        super().__init__(store)
        self._snapshot = snapshot

    def __iter__(self) -> Iterator[V]:
        return (value for _, value in self._snapshot())

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self)
