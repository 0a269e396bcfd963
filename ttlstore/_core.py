"""StoreCore: the machinery under TTLStore's public methods.

:class:`~ttlstore.store.TTLStore` holds the public surface (argument checks, locking, docs);
this class holds the state and every step that runs under the lock: the write path, reclaiming,
removal accounting, the bodies of the less frequent methods. Split from ``store.py`` to keep
each file readable; the two are one class hierarchy of two levels, compiled together by mypyc.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from types import FunctionType
from typing import Any, Final, Protocol, TypeVar

from ttlstore._deadlines import INF, DeadlineIndex, Entry
from ttlstore._slot import KEEP, WRITE, Plan, Slot
from ttlstore._types import DEFAULT_TTL, RemovalCause, RemovalListener, StoreDefault, StoreStats

__all__ = ["MISSING", "Flight", "Lock", "StoreCore"]

K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")

logger = logging.getLogger("ttlstore")

MISSING: Any = object()
"""An argument or result that is not there (``None`` may be a stored value)."""

_new_entry = Entry.__new__
# Whether Entry is an interpreted class (not compiled by mypyc), which _set() builds without
# calling its constructor.
_PURE: Final = isinstance(Entry.__init__, FunctionType)

# Due entries reclaimed per lock hold when len(), iteration or popitem() meet a backlog.
_BACKLOG_SLICE = 1024


class Lock(Protocol):
    """What the store needs of its lock (``threading.Lock``; tests put a spy in its place)."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...


class Flight:
    """One get_or_set() factory call in progress, which other callers of the key wait on."""

    __slots__ = ("done", "error", "owner", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.owner = threading.get_ident()
        self.value: Any = None
        self.error: BaseException | None = None


class StoreCore(MutableMapping[K, V]):
    """State and locked steps of a TTLStore; see :class:`~ttlstore.store.TTLStore`."""

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
        weigher: Callable[[K, V], float] | None,
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
        self._data: OrderedDict[K, Entry[K, V]] = OrderedDict()
        # Bound once: the hot reads save an attribute lookup each. _data is therefore never
        # replaced, only cleared in place.
        self._lookup = self._data.get
        self._to_end = self._data.move_to_end
        self._index: DeadlineIndex[K, V] = DeadlineIndex(ttl)
        self._flights: dict[K, Flight] = {}
        # Reused by every compute() (see ttlstore._slot): one call at a time holds the lock.
        self._plan = Plan()
        self._slot: Slot[K, V] = Slot(self._plan)
        self._hits = self._misses = self._writes = 0
        self._expirations = self._evictions = self._deletions = self._replacements = 0

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
        called, each because a call measured slower (figures at each step: medians of 25
        interleaved rounds, n = 1 000, CPython 3.11, against this code with that step moved
        into a method of its own).
        """
        now = self._clock()
        deadline = (INF if ttl is None else now + ttl) if at is None else at
        data = self._data
        entry = data.get(key)
        if entry is not None and entry.deadline > now:
            if only_new:
                return False
            # Replace. Inline: as a _replace() call, set-update was 13-17 % slower.
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
                # Make room. Inline: as a _make_room() call, set-evict was 4-8 % slower.
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
                # Interpreted, a constructor call made set-evict 3-5 % slower (measured as
                # above): build the entry without one. Compiled, the constructor is a direct
                # C call, and the only way mypyc builds an Entry.
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
            # DeadlineIndex.file() written out for its common case (default TTL, in order):
            # calling it made set-evict 8-9 % slower.
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
        plan = self._plan
        slot = self._slot
        if plan.busy:  # an outer compute()'s function called this (unlocked) store
            plan = Plan()
            slot = Slot(plan)
        entry = self._live(key)
        slot.key = key
        slot.now = now = self._clock()
        if entry is None:
            slot.found = False
            slot.value = None  # type: ignore[assignment]
        else:
            slot.found = True
            slot.value = entry.value
        plan.op = KEEP
        plan.busy = True
        try:
            result = fn(slot)
        finally:
            plan.busy = False
            # Hold no reference to the value or key once the call is over.
            slot.key = slot.value = None  # type: ignore[assignment]
            slot.found = False
        # fn returned: weigh what it asked to write (may raise: nothing done yet), count the
        # read, then do what it asked for.
        op = plan.op
        if op == KEEP:
            if entry is None:
                self._misses += 1
            else:
                self._hit(entry)
            return result
        weight = 0.0
        if op == WRITE and self._weigher is not None:
            weight = self._weigh(key, plan.value)
        if entry is None:
            self._misses += 1
        else:
            self._hit(entry)
        if op == WRITE:
            self._compute_write(key, plan, now, weight)
            plan.value = None
        elif entry is not None:  # REMOVE
            entry = self._data[key]  # _hit() may have renewed it, never replaced it
            del self._data[key]
            self._removed(entry, RemovalCause.DELETED)
        return result

    def _compute_write(self, key: K, plan: Plan, now: float, weight: float) -> None:
        deadline = plan.deadline
        if deadline is None:
            ttl = self._ttl if plan.ttl is DEFAULT_TTL else plan.ttl
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

    def _touch(self, key: K, ttl: float | StoreDefault | None) -> bool:
        entry = self._live(key)
        if entry is None:
            return False
        if ttl is not DEFAULT_TTL:
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

    def _claim(self, key: K) -> tuple[V | None, Flight | None, bool]:
        """Look ``key`` up for get_or_set: (value, None, _) on a hit, else its flight."""
        entry = self._live(key)
        if entry is not None:
            return self._hit(entry), None, False
        self._misses += 1
        flight = self._flights.get(key)
        if flight is not None:
            return None, flight, False
        flight = self._flights[key] = Flight()
        return None, flight, True

    def _land(self, key: K, flight: Flight) -> None:
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
