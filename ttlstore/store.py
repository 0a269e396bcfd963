"""TTLStore: a bounded mapping with per-entry TTL, LRU eviction and removal callbacks.

Layout: an ``OrderedDict`` from key to one small :class:`~ttlstore._deadlines.Entry` keeps the
recency order (least recently used first), and a :class:`~ttlstore._deadlines.DeadlineIndex`
finds due entries without scanning. Reads check the entry's own deadline, so the index only
decides *when memory is reclaimed*, never what is visible.

With ``threadsafe=True`` (the default) :func:`TTLStore` builds a :class:`_LockedTTLStore`, whose
public methods each run under one ``threading.Lock``. The hot reads are written out twice, once
per variant, because a shared helper would cost a Python call on every read.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    MutableMapping,
    ValuesView,
)
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from ttlstore._checks import positive_int, ttl_or_none
from ttlstore._deadlines import INF, DeadlineIndex, Entry

__all__ = ["RemovalCause", "StoreStats", "TTLStore"]

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
    """Removed explicitly: ``del``, ``pop``, ``popitem``, ``clear``."""
    REPLACED = "replaced"
    """Overwritten by a write to the same key."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """An immutable snapshot of a store's counters."""

    hits: int
    misses: int
    writes: int
    expirations: int
    evictions: int
    deletions: int
    replacements: int
    size: int
    weight: float


class _Unset(enum.Enum):
    """Marker for "argument not given": ``ttl=None`` already means "no expiry"."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "<store default>"


UNSET = _Unset.UNSET
_MISSING: Any = object()

_new_entry = Entry.__new__

# Due entries reclaimed per lock hold when len(), iteration or stats() meet a backlog.
_BACKLOG_SLICE = 1024

RemovalListener = Callable[[K, V, RemovalCause], object]


class _Flight:
    """One get_or_set() factory call in progress, which other callers of the key wait on."""

    __slots__ = ("done", "error", "owner", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.owner = threading.get_ident()
        self.value: Any = None
        self.error: BaseException | None = None


class TTLStore(MutableMapping[K, V]):
    """A bounded mapping whose entries expire after a TTL and are evicted least recently used.

    ``len(store) <= maxsize`` always; with ``weigher``, the total weight stays ``<= maxweight``.
    An entry at or past its deadline is invisible to every method, reclaimed or not.

    :param maxsize: the most entries held at once (a positive int).
    :param ttl: default seconds an entry lives after it is written; ``None`` for no expiry.
    :param sliding: a successful read renews the entry's deadline (time-to-idle).
    :param maxweight: bound on the sum of ``weigher(key, value)`` over all entries.
    :param weigher: the weight of one entry, a non-negative number; needs ``maxweight``.
    :param clock: seconds as a float from a monotonic source; inject a fake one in tests.
    :param on_remove: called as ``on_remove(key, value, cause)`` for every removal, after the
        store's lock is released; an exception in it is logged on logger ``ttlstore``.
    :param threadsafe: every public method is atomic under one lock (also without a GIL).
        ``False`` drops the lock, for use from one thread or one event loop.

    TTLStore is not meant to be subclassed: wrap it instead.
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

    _lock: threading.Lock

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Locking is woven into the concrete classes; a user subclass would silently lose it.
        if cls.__module__ != __name__:
            raise TypeError("TTLStore is not designed for subclassing; wrap it instead")
        super().__init_subclass__(**kwargs)

    def __new__(cls, *args: Any, threadsafe: bool = True, **kwargs: Any) -> TTLStore[K, V]:
        if cls is TTLStore and threadsafe:
            cls = _LockedTTLStore
        return super().__new__(cls)

    def __init__(
        self,
        maxsize: int,
        ttl: float | None = None,
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
        self._sliding = bool(sliding)
        self._maxweight = maxweight
        self._weigher = weigher
        self._weighed: dict[K, float] = {}
        self._weight: float = 0
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

    # ------------------------------------------------------------------ hot reads (no lock)

    def get(self, key: K, default: D | None = None) -> V | D | None:  # type: ignore[override]
        """Return the value of ``key``, or ``default`` if absent or expired. O(1).

        A hit moves the key to the most recently used end (and, with ``sliding``, renews its
        deadline); it counts as a hit or a miss in :meth:`stats`.
        """
        entry = self._lookup(key)
        if entry is not None:
            now = self._clock()
            if entry.deadline > now:
                self._to_end(key)
                self._hits += 1
                if self._sliding and entry.ttl is not None and now + entry.ttl > entry.deadline:
                    entry.deadline = now + entry.ttl
                return entry.value
            self._run(self._drop_expired, entry)
        self._misses += 1
        return default

    def __getitem__(self, key: K) -> V:
        """Return the value of ``key`` as :meth:`get` does; ``KeyError`` if absent. O(1)."""
        entry = self._lookup(key)
        if entry is not None:
            now = self._clock()
            if entry.deadline > now:
                self._to_end(key)
                self._hits += 1
                if self._sliding and entry.ttl is not None and now + entry.ttl > entry.deadline:
                    entry.deadline = now + entry.ttl
                return entry.value
            self._run(self._drop_expired, entry)
        self._misses += 1
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` holds a live entry; touches neither recency nor stats. O(1)."""
        entry = self._lookup(key)  # type: ignore[arg-type]
        return entry is not None and entry.deadline > self._clock()

    def peek(self, key: K, default: D | None = None) -> V | D | None:
        """Return the value of ``key`` without touching recency, deadline or stats. O(1)."""
        entry = self._lookup(key)
        if entry is not None and entry.deadline > self._clock():
            return entry.value
        return default

    # ------------------------------------------------------------------ public API

    def set(self, key: K, value: V, ttl: float | _Unset | None = UNSET) -> None:
        """Store ``value`` under ``key``, as the most recently used entry.

        ``ttl`` overrides the store's default for this entry; ``None`` means no expiry. When the
        store is full, due entries are reclaimed first (as many as needed to make room), then
        the least recently used live ones are evicted. O(1) amortized with the default TTL,
        O(log n) with another TTL.
        """
        ttl = self._ttl if ttl is UNSET else ttl_or_none("ttl", ttl)
        weight = 0 if self._weigher is None else self._weigh(key, value)
        # Called directly rather than through _run(): this is a hot path.
        self._set(key, value, ttl, weight, False)
        if self._pending:
            self._flush()

    def __setitem__(self, key: K, value: V) -> None:
        """Store ``value`` under ``key`` with the default TTL, as :meth:`set` does."""
        weight = 0 if self._weigher is None else self._weigh(key, value)
        self._set(key, value, self._ttl, weight, False)
        if self._pending:
            self._flush()

    def add(self, key: K, value: V, ttl: float | _Unset | None = UNSET) -> bool:
        """Store ``value`` only if ``key`` holds no live entry; return whether it did.

        Complexity as :meth:`set`.
        """
        ttl = self._ttl if ttl is UNSET else ttl_or_none("ttl", ttl)
        return self._run(self._set, key, value, ttl, self._weigh(key, value), True)

    def setdefault(self, key: K, default: V = None, ttl: float | _Unset | None = UNSET) -> V:  # type: ignore[assignment]
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

    def touch(self, key: K, ttl: float | _Unset | None = UNSET) -> bool:
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

    def get_or_set(self, key: K, factory: Callable[[], V], ttl: float | _Unset | None = UNSET) -> V:
        """Return the live value of ``key``, or compute it once with ``factory()`` and store it.

        Concurrent callers of a missing key wait for one factory call and share its result; if
        it raises, every one of them gets the exception and nothing is stored. A factory that
        asks for its own key raises ``RuntimeError`` rather than deadlock. O(1) plus the one
        factory call; waiters block until it returns.
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

    def stats(self) -> StoreStats:
        """An immutable snapshot of the counters, after reclaiming due entries. O(1) amortized."""
        self._reclaim_backlog()
        return self._run(self._stats)

    @property
    def maxsize(self) -> int:
        """The most entries the store holds."""
        return self._maxsize

    @property
    def threadsafe(self) -> bool:
        """Whether every public method runs under the store's lock."""
        return self._lock_or_none() is not None

    @property
    def default_ttl(self) -> float | None:
        """The TTL of entries written without one, ``None`` for no expiry."""
        return self._ttl

    def __len__(self) -> int:
        """Number of live entries, after reclaiming due ones. O(1) amortized."""
        self._reclaim_backlog()
        return self._run(self._live_len)

    def __iter__(self) -> Iterator[K]:
        """Iterate over a snapshot of the live keys, least recently used first. O(n).

        The snapshot is taken at one instant, so it never disagrees with ``len`` at that
        instant, and later writes never break the iteration.
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
        return _ItemsView(self)

    def values(self) -> ValuesView[V]:
        """A view of the live values, iterated from a snapshot without touching recency.

        O(1), O(n) to iterate or to test membership.
        """
        return _ValuesView(self)

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
        """Run ``method`` atomically, then deliver removal callbacks."""
        try:
            return method(*args)
        finally:
            if self._pending:
                self._flush()

    def _lock_or_none(self) -> threading.Lock | None:
        return None

    def _flush(self) -> None:
        """Deliver queued removals to ``on_remove``, outside the lock."""
        lock = self._lock_or_none()
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
            return 0
        weight = weigher(key, value)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weigher must return a number, got {weight!r} for key {key!r}")
        if not weight >= 0:  # also rejects NaN
            raise ValueError(f"weight must be >= 0, got {weight!r} for key {key!r}")
        if weight > self._maxweight:  # type: ignore[operator]
            raise ValueError(
                f"weight {weight!r} of key {key!r} exceeds maxweight {self._maxweight!r}"
            )
        return weight

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

    def _shed_weight(self, now: float, weight: float, replacing: bool) -> None:
        """Reclaim due entries, then evict LRU ones, until ``weight`` more fits the bound.

        When ``replacing``, the entry being replaced sits at the MRU end with weight 0 by now
        and must never be its own victim: once it is the only one left, everything fits.
        """
        maxweight: float = self._maxweight  # type: ignore[assignment]
        # Due entries go first, one at a time: only as many as the new weight needs, so a
        # backlog of due entries costs this write no more than what it frees.
        while self._weight + weight > maxweight and self._expire(1, now):
            pass
        data = self._data
        last = 1 if replacing else 0
        while self._weight + weight > maxweight:
            if len(data) <= last:
                # Only float residue of many additions and subtractions is left over.
                self._weight = 0
                break
            self._removed(data.popitem(False)[1], RemovalCause.EVICTED)

    def _set(self, key: K, value: V, ttl: float | None, weight: float, only_new: bool) -> bool:
        """Write ``key``; the body of set/add/[]= under the lock.

        The path of a new key into a full store runs on every write of a cache at capacity, so
        the eviction (:meth:`_removed` for ``EVICTED``) and the FIFO filing
        (:meth:`DeadlineIndex.file`) are written out here rather than called.
        """
        data = self._data
        now = self._clock()
        deadline = INF if ttl is None else now + ttl
        entry = data.get(key)
        if entry is None or entry.deadline <= now:
            if entry is not None:
                del data[key]
                self._removed(entry, RemovalCause.EXPIRED)
            index = self._index
            fifo = index.fifo
            if len(data) >= self._maxsize:
                # Full: reclaim due entries first, then evict least recently used ones.
                heap = index.heap
                if (fifo and fifo[0].filed <= now) or (heap and heap[0][0] <= now):  # type: ignore[operator]
                    # One due entry frees the one slot needed; the rest of a backlog is left to
                    # sweeps and reads, so a write never pays for more than it frees.
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
            if ttl == self._ttl and deadline != INF and (not fifo or fifo[-1].filed <= deadline):  # type: ignore[operator]
                # DeadlineIndex.file() written out for its common case, and the entry built
                # without calling __init__ (30 ns of a 400 ns write).
                entry = _new_entry(Entry)
                entry.key = key
                entry.value = value
                entry.deadline = entry.filed = deadline
                entry.ttl = ttl
                data[key] = entry
                fifo.append(entry)
            else:
                entry = data[key] = Entry(key, value, deadline, ttl)
                if deadline != INF:
                    index.file(entry)
        elif only_new:
            return False
        else:
            data.move_to_end(key)
            if self._weigher is not None:
                # Count the new weight before making room, so the bound holds throughout.
                self._weight -= self._weighed[key]
                self._weighed[key] = 0
                self._shed_weight(now, weight, replacing=True)
            old_value = entry.value
            if entry.filed is None or deadline >= entry.filed:
                # Later deadline: update in place; the old item is re-filed when it surfaces.
                entry.value = value
                entry.deadline = deadline
                entry.ttl = ttl
                if entry.filed is None and deadline != INF:
                    self._index.file(entry)
            else:
                old = entry
                entry = Entry(key, value, deadline, ttl)
                data[key] = entry
                self._index.discard(old, data)
                self._index.file(entry)
            self._replacements += 1
            if self._on_remove is not None:
                self._pending.append((key, old_value, RemovalCause.REPLACED))
        if self._weigher is not None:
            self._weighed[key] = weight
            self._weight += weight
        self._writes += 1
        return True

    def _setdefault(self, key: K, default: V, ttl: float | None, weight: float) -> V:
        entry = self._lookup(key)
        if entry is not None and entry.deadline > self._clock():
            return self._hit(entry)
        self._set(key, default, ttl, weight, False)
        return default

    def _update(self, items: list[tuple[K, V]], weights: list[float]) -> None:
        for (key, value), weight in zip(items, weights, strict=True):
            self._set(key, value, self._ttl, weight, False)

    def _hit(self, entry: Entry[K, V]) -> V:
        """Count a read of a live entry: recency, sliding deadline, stats."""
        self._data.move_to_end(entry.key)
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
        deadline = INF if entry.ttl is None else self._clock() + entry.ttl
        self._to_end(key)
        if entry.filed is None or deadline >= entry.filed:
            entry.deadline = deadline
            if entry.filed is None and deadline != INF:
                self._index.file(entry)
        else:
            fresh = Entry(key, entry.value, deadline, entry.ttl)
            self._data[key] = fresh
            self._index.discard(entry, self._data)
            self._index.file(fresh)
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
        self._weight = 0  # drop float residue

    def _stats(self) -> StoreStats:
        self._expire(None)
        return StoreStats(
            hits=self._hits,
            misses=self._misses,
            writes=self._writes,
            expirations=self._expirations,
            evictions=self._evictions,
            deletions=self._deletions,
            replacements=self._replacements,
            size=len(self._data),
            weight=self._weight,
        )

    def _live_len(self) -> int:
        self._expire(None)
        return len(self._data)

    def _snapshot_keys(self) -> list[K]:
        self._expire(None)
        return list(self._data)

    def _snapshot_items(self) -> list[tuple[K, V]]:
        """Every live (key, value) pair at one instant, LRU first. O(n)."""
        self._reclaim_backlog()
        return self._run(self._items_now)

    def _items_now(self) -> list[tuple[K, V]]:
        self._expire(None)
        return [(key, entry.value) for key, entry in self._data.items()]

    def _reclaim_backlog(self) -> None:
        """Reclaim due entries slice by slice, releasing the lock in between.

        Called before an operation that must reclaim every due entry under the lock (len,
        iteration, stats, popitem), so that a large backlog never blocks other threads for
        longer than one slice; the operation itself then finds little left to do.
        """
        if self._lock_or_none() is not None:
            while self._run(self._expire, _BACKLOG_SLICE) == _BACKLOG_SLICE:
                pass


class _LockedTTLStore(TTLStore[K, V]):
    """TTLStore whose every public method runs under one lock; callbacks run after release."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()

    def _lock_or_none(self) -> threading.Lock:
        return self._lock

    def _run(self, method: Callable[..., R], *args: Any) -> R:
        # acquire()/release() rather than ``with``: half the cost on CPython 3.11.
        self._lock.acquire()
        try:
            return method(*args)
        finally:
            self._lock.release()
            if self._pending:
                self._flush()

    def get(self, key: K, default: D | None = None) -> V | D | None:  # type: ignore[override]
        lock = self._lock
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
        lock = self._lock
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
        raise KeyError(key)

    def __setitem__(self, key: K, value: V) -> None:
        weight = 0 if self._weigher is None else self._weigh(key, value)
        lock = self._lock
        lock.acquire()
        try:
            self._set(key, value, self._ttl, weight, False)
        finally:
            lock.release()
            if self._pending:
                self._flush()

    def set(self, key: K, value: V, ttl: float | _Unset | None = UNSET) -> None:
        ttl = self._ttl if ttl is UNSET else ttl_or_none("ttl", ttl)
        weight = 0 if self._weigher is None else self._weigh(key, value)
        lock = self._lock
        lock.acquire()
        try:
            self._set(key, value, ttl, weight, False)
        finally:
            lock.release()
            if self._pending:
                self._flush()

    def __contains__(self, key: object) -> bool:
        lock = self._lock
        lock.acquire()
        try:
            entry = self._lookup(key)  # type: ignore[arg-type]
            return entry is not None and entry.deadline > self._clock()
        finally:
            lock.release()

    def peek(self, key: K, default: D | None = None) -> V | D | None:
        lock = self._lock
        lock.acquire()
        try:
            entry = self._lookup(key)
            if entry is not None and entry.deadline > self._clock():
                return entry.value
            return default
        finally:
            lock.release()


class _ItemsView(ItemsView[K, V]):
    """Items of a TTLStore: iterated from an atomic snapshot, checked with ``peek``."""

    _mapping: TTLStore[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return iter(self._mapping._snapshot_items())

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        found = self._mapping.peek(key, _MISSING)
        return found is not _MISSING and (found is value or found == value)


class _ValuesView(ValuesView[V]):
    """Values of a TTLStore: iterated from an atomic snapshot, touching no recency."""

    _mapping: TTLStore[Any, V]

    def __iter__(self) -> Iterator[V]:
        return (value for _, value in self._mapping._snapshot_items())

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self)
