"""The steps of a TTLStore that run under its lock, as functions of the store: the plumbing
(lock, callbacks, weights, removals, expiry) and the reads and removals. The write path is in
:mod:`ttlstore._writes`, get_or_set()'s single flight in :mod:`ttlstore._flights`.

Each takes the store as ``self`` and is what a method would be. They are module functions, not
methods, because :class:`~ttlstore._core.StoreCore` allows an interpreted subclass (TTLStore,
which adds weak references and argument checks): compiled code then calls a method of ``self``
through Python's attribute lookup (85 ns against 43 ns for a function, measured with mypyc on
CPython 3.11), while a module function is a direct C call. Interpreted, both cost the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias, TypeVar

from ttlstore._deadlines import INF, Entry
from ttlstore._types import RemovalCause, StoreStats

if TYPE_CHECKING:
    from ttlstore._core import StoreCore

__all__ = ["BACKLOG_SLICE", "DELETED", "EVICTED", "EXPIRED", "MISSING", "REPLACED", "Lock"]

# Keys and values as the compiled core sees them. The core is not Generic: mypyc gives a
# Generic class a __dict__ and a weak-reference slot, which costs every entry 16 bytes and
# which CPython 3.11's collector mis-traverses (a weak reference to such an object crashed it).
# TTLStore declares the typed API.
K: TypeAlias = Any
V: TypeAlias = Any
R = TypeVar("R")

logger: Final = logging.getLogger("ttlstore")

# RemovalCause's members as this module's constants. Compiled, a Final is a C static, where
# RemovalCause.EXPIRED reads a global and then an attribute through EnumType's __getattr__
# hook: 140 ns a read on CPython 3.11, interpreted as well (timeit).
EXPIRED: Final = RemovalCause.EXPIRED
EVICTED: Final = RemovalCause.EVICTED
DELETED: Final = RemovalCause.DELETED
REPLACED: Final = RemovalCause.REPLACED

MISSING: Final[Any] = object()
"""An argument or result that is not there (``None`` may be a stored value)."""

BACKLOG_SLICE: Final = 1024
"""Due entries reclaimed per lock hold when len(), iteration or popitem() meet a backlog."""


class Lock(Protocol):
    """What the store needs of its lock (``threading.Lock``; tests put a spy in its place)."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...


# ---------------------------------------------------------------------- plumbing


def run(self: StoreCore, step: Callable[..., R], *args: Any) -> R:
    """Run ``step(self, *args)`` atomically (under the lock, if any), then deliver removal
    callbacks."""
    lock = self._lock
    if lock is not None:
        lock.acquire()
    try:
        result: R = step(self, *args)
        return result
    finally:
        if lock is not None:
            lock.release()
        if self._pending:
            flush(self)


def read(self: StoreCore, key: K, default: Any) -> Any:
    """A read of ``key`` as ``get`` does it, under the lock (if any), for ``[]``."""
    lock = self._lock
    if lock is not None:
        lock.acquire()
    try:
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
    finally:
        if lock is not None:
            lock.release()
    if self._pending:
        flush(self)
    return default


def flush(self: StoreCore) -> None:
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


def weigh(self: StoreCore, key: K, value: V) -> float:
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
        raise ValueError(f"weight {weight!r} of key {key!r} exceeds maxweight {self._maxweight!r}")
    return float(weight)


def removed(self: StoreCore, entry: Entry, cause: RemovalCause) -> None:
    """Account for ``entry`` having just left ``_data``."""
    if entry.filed is not None:
        self._index.discard(entry, self._data)
    if self._weigher is not None:
        self._weight -= self._weighed.pop(entry.key)
    if cause is EXPIRED:
        self._expirations += 1
    elif cause is EVICTED:
        self._evictions += 1
    elif cause is DELETED:
        self._deletions += 1
    if self._on_remove is not None:
        self._pending.append((entry.key, entry.value, cause))


def drop_expired(self: StoreCore, entry: Entry) -> None:
    """Remove an entry a read found past its deadline."""
    if self._data.get(entry.key) is entry:  # another thread may have been first
        del self._data[entry.key]
        removed(self, entry, EXPIRED)


def expire_due(self: StoreCore, limit: int | None, now: float | None = None) -> int:
    due = self._index.pop_due(self._clock() if now is None else now, limit, self._data)
    if due:
        # The index already deleted them from _data; account for them in bulk.
        self._expirations += len(due)
        if self._weigher is not None:
            for entry in due:
                self._weight -= self._weighed.pop(entry.key)
        if self._on_remove is not None:
            expired = EXPIRED
            self._pending.extend((entry.key, entry.value, expired) for entry in due)
    return len(due)


# ---------------------------------------------------------------------- method bodies


def hit(self: StoreCore, entry: Entry) -> V:
    """Count a read of a live entry: recency, sliding deadline, stats."""
    self._to_end(entry.key)
    self._hits += 1
    if self._sliding and entry.ttl is not None:
        entry.deadline = max(entry.deadline, self._clock() + entry.ttl)
    return entry.value


def live(self: StoreCore, key: K) -> Entry | None:
    """The live entry of ``key``, reclaiming it if it is due."""
    entry = self._lookup(key)
    if entry is not None and entry.deadline <= self._clock():
        drop_expired(self, entry)
        return None
    return entry


def do_pop(self: StoreCore, key: K, default: Any) -> Any:
    entry = live(self, key)
    if entry is None:
        return default
    del self._data[key]
    removed(self, entry, DELETED)
    return entry.value


def do_popitem(self: StoreCore) -> tuple[K, V] | None:
    expire_due(self, None)
    if not self._data:
        return None
    key, entry = self._data.popitem(False)
    removed(self, entry, DELETED)
    return key, entry.value


def remaining(self: StoreCore, key: K) -> float | None:
    entry = self._lookup(key)
    now = self._clock()
    if entry is None or entry.deadline <= now:
        raise KeyError(key)
    return None if entry.deadline == INF else entry.deadline - now


def do_clear(self: StoreCore) -> None:
    now = self._clock()
    entries = list(self._data.values())
    self._data.clear()
    self._index.clear()
    for entry in entries:
        entry.filed = None  # the index is already empty: nothing turns stale
        due = entry.deadline <= now
        removed(self, entry, EXPIRED if due else DELETED)
    self._weight = 0.0  # drop float residue


def snapshot_stats(self: StoreCore) -> StoreStats:
    return StoreStats(
        hits=self._hits,
        misses=self._misses,
        writes=self._writes,
        expirations=self._expirations,
        evictions=self._evictions,
        deletions=self._deletions,
        replacements=self._replacements,
        size=live_count(self),
        weight=self._weight,
    )


def live_count(self: StoreCore) -> int:
    return len(self._data) - self._index.count_due(self._clock(), self._data)


def live_len(self: StoreCore) -> int:
    expire_due(self, None)
    return len(self._data)


def snapshot_keys(self: StoreCore) -> list[K]:
    expire_due(self, None)
    return list(self._data)


def items_now(self: StoreCore) -> list[tuple[K, V]]:
    expire_due(self, None)
    return [(key, entry.value) for key, entry in self._data.items()]


def reclaim_backlog(self: StoreCore) -> None:
    """Reclaim due entries slice by slice, releasing the lock in between.

    Called before an operation that must reclaim every due entry under the lock (len,
    iteration, popitem), so that a large backlog never blocks other threads for longer
    than one slice; the operation itself then finds little left to do.
    """
    if self._lock is not None:
        while run(self, expire_due, BACKLOG_SLICE) == BACKLOG_SLICE:
            pass
