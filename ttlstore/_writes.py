"""The write path of a TTLStore, and the method bodies built on it, as functions of the store.

Functions of the store rather than methods, for the reason given in :mod:`ttlstore._steps`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from types import FunctionType
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

from ttlstore._deadlines import INF, Entry
from ttlstore._slot import Slot
from ttlstore._slot_core import KEEP, WRITE, Plan, SlotCore
from ttlstore._steps import (
    DELETED,
    EVICTED,
    EXPIRED,
    REPLACED,
    drop_expired,
    expire_due,
    flush,
    hit,
    live,
    removed,
    weigh,
)
from ttlstore._types import DEFAULT_TTL, StoreDefault

if TYPE_CHECKING:
    from ttlstore._core import StoreCore

__all__: list[str] = []

# Keys and values as the compiled core sees them (see ttlstore._steps).
K: TypeAlias = Any
V: TypeAlias = Any
R = TypeVar("R")

_new_entry: Final = Entry.__new__
# The methods a write calls on the store's OrderedDict and deque, as Finals called with the
# object first: compiled, a method of a class mypyc does not know is looked up by name on
# every call.
_popitem: Final = OrderedDict.popitem
_popleft: Final = deque.popleft
_append: Final = deque.append
# A threading.Lock's methods, called with the lock first for the same reason (a store's lock
# is one unless a test put a stand-in there, which is called by name).
LOCK_TYPE: Final = type(threading.Lock())
acquire_lock: Final = LOCK_TYPE.acquire
release_lock: Final = LOCK_TYPE.release
# Whether Entry is an interpreted class (not compiled by mypyc), which write() builds without
# calling its constructor.
_PURE: Final = isinstance(Entry.__init__, FunctionType)


def write(
    self: StoreCore,
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
            shed_weight(self, now, weight, replacing=True)
        old_value = entry.value
        entry.ttl = ttl
        if entry.filed is not None and deadline >= entry.filed:
            # _redate()'s common case, written out.
            entry.value = value
            entry.deadline = deadline
        else:
            redate(self, entry, deadline, value)
        self._replacements += 1
        if self._on_remove is not None:
            self._pending.append((key, old_value, REPLACED))
    else:
        if entry is not None:
            del data[key]
            removed(self, entry, EXPIRED)
        if len(data) >= self._maxsize:
            # Make room. Inline: as a _make_room() call, set-evict was 4-8 % slower.
            index = self._index
            fifo = index.fifo
            heap = index.heap
            if (fifo and fifo[0].filed <= now) or (heap and heap[0][0] <= now):  # type: ignore[operator]
                # One due entry frees the one slot needed; the rest of a backlog is left
                # to sweeps and reads, so a write never pays for more than it frees.
                expire_due(self, 1, now)
            while len(data) >= self._maxsize:
                victim = _popitem(data, False)[1]
                if victim.filed is not None:
                    if fifo and fifo[0] is victim:
                        _popleft(fifo)  # the common case: LRU and FIFO heads coincide
                    else:
                        index.discard(victim, data)
                self._evictions += 1
                if self._weigher is not None:
                    self._weight -= self._weighed.pop(victim.key)
                if self._on_remove is not None:
                    self._pending.append((victim.key, victim.value, EVICTED))
        if self._weigher is not None:
            shed_weight(self, now, weight, replacing=False)
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
            _append(fifo, entry)
        elif deadline != INF:
            self._index.file(entry)
    if self._weigher is not None:
        self._weighed[key] = weight
        self._weight += weight
    self._writes += 1
    return True


def redate(self: StoreCore, entry: Entry, deadline: float, value: V) -> None:
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


def shed_weight(self: StoreCore, now: float, weight: float, replacing: bool) -> None:
    """Reclaim due entries, then evict LRU ones, until ``weight`` more fits the bound.

    When ``replacing``, the entry being replaced sits at the MRU end with weight 0 by now
    and must never be its own victim: once it is the only one left, everything fits.
    """
    maxweight = self._maxweight
    # Due entries go first, one at a time: only as many as the new weight needs, so a
    # backlog of due entries costs this write no more than what it frees.
    while self._weight + weight > maxweight and expire_due(self, 1, now):
        pass
    data = self._data
    last = 1 if replacing else 0
    while self._weight + weight > maxweight:
        if len(data) <= last:
            # Only float residue of many additions and subtractions is left over.
            self._weight = 0.0
            break
        removed(self, data.popitem(False)[1], EVICTED)


def do_setdefault(self: StoreCore, key: K, default: V, ttl: float | None, weight: float) -> V:
    entry = live(self, key)
    if entry is not None:
        return hit(self, entry)
    write(self, key, default, ttl, weight, False)
    return default


def do_update(self: StoreCore, items: list[tuple[K, V]], weights: list[float]) -> None:
    for (key, value), weight in zip(items, weights, strict=True):
        write(self, key, value, self._ttl, weight, False)


def do_touch(self: StoreCore, key: K, ttl: float | StoreDefault | None) -> bool:
    entry = live(self, key)
    if entry is None:
        return False
    if ttl is not DEFAULT_TTL:
        entry.ttl = ttl
    self._to_end(key)
    redate(self, entry, INF if entry.ttl is None else self._clock() + entry.ttl, entry.value)
    return True


def locked_compute(self: StoreCore, key: K, fn: Callable[[Slot[Any, Any]], R]) -> R:
    """:meth:`StoreCore.compute`: :func:`do_compute` under the lock, then the callbacks.

    A function, so that the compiled rate limiter calls it natively: the method of a class
    that allows interpreted subclasses is looked up by name and parses its arguments (with
    this, acquire ran 8.1 k instructions instead of 8.4 k, callgrind, compiled). run()
    written out, and twice for the lock: a threading.Lock's methods called as Finals skip
    the lookup by name (240 instructions an acquire, compiled); a stand-in is called by name.
    """
    lock = self._lock
    if lock is None:
        result = do_compute(self, key, fn)
    elif type(lock) is LOCK_TYPE:
        acquire_lock(lock)
        try:
            result = do_compute(self, key, fn)
        finally:
            release_lock(lock)
    else:
        lock.acquire()
        try:
            result = do_compute(self, key, fn)
        finally:
            lock.release()
    if self._pending:
        flush(self)
    return result


def do_compute(self: StoreCore, key: K, fn: Callable[[Slot[Any, Any]], R]) -> R:
    plan = self._plan
    slot: SlotCore = self._slot
    if plan.busy:  # an outer compute()'s function called this (unlocked) store
        plan = Plan()
        slot = Slot(plan)
    # live() and hit() written out, one clock reading for the whole call, and the common
    # write done in place below: with calls to live(), hit() and write() and three clock
    # readings, the rate limiter's acquire cost 4.0 us against 3.1 (pure, 1 000 keys x 20,
    # medians of 9 interleaved runs; with Slot.set's fast path for a float deadline).
    now = self._clock()
    entry = self._lookup(key)
    # An entry past its deadline is hidden from fn. In a locked store, where fn cannot reach
    # the store, it leaves once fn has decided, so that a write of the key again can reuse
    # it (see below); an unlocked store's fn may read the store, so it leaves now.
    lapsed: Entry | None = None
    if entry is not None and entry.deadline <= now:
        if self._lock is None:
            drop_expired(self, entry)
        else:
            lapsed = entry
        entry = None
    slot.key = key
    slot.now = now
    if entry is None:
        slot.found = False
        slot.value = None
    else:
        slot.found = True
        slot.value = entry.value
    plan.op = KEEP
    plan.busy = True
    # The store's Slot is the generic one: passed as it is, since a typing.cast() is a
    # Python call per compute() in the interpreted build.
    call: Callable[[Any], R] = fn
    try:
        result = call(slot)
    except BaseException:
        if lapsed is not None:
            drop_expired(self, lapsed)
        raise
    finally:
        plan.busy = False
        # Hold no reference to the value or key once the call is over.
        slot.key = slot.value = None
        slot.found = False
    op = plan.op
    if lapsed is not None and (op != WRITE or self._weigher is not None):
        drop_expired(self, lapsed)  # nothing to write in its place (or weigh() may raise)
        lapsed = None
    # fn returned: weigh what it asked to write (may raise: nothing done yet), count the
    # read, then do what it asked for.
    weight = 0.0
    if op == WRITE and self._weigher is not None:
        weight = weigh(self, key, plan.value)
    if entry is None:
        self._misses += 1
    else:
        self._to_end(key)
        self._hits += 1
        if self._sliding and entry.ttl is not None and now + entry.ttl > entry.deadline:
            entry.deadline = now + entry.ttl
    if op == WRITE:
        value = plan.value
        plan.value = None
        deadline = plan.deadline
        # The entry written in place: a live one, or a lapsed one still stored (a stand-in
        # lock may let fn reach the store).
        target = entry
        if lapsed is not None and self._data.get(key) is lapsed:
            target = lapsed
        if (
            target is not None
            and deadline is not None
            and deadline > now
            and target.filed is not None
            and deadline >= target.filed
            and self._weigher is None
        ):
            # write()'s in-place replacement, written out for an entry given a deadline no
            # earlier than its filed one: the rate limiter's every allowed acquire. A lapsed
            # entry leaves as what dropping it and filing a new one would (the key most
            # recent, an expiration, a miss, a write): a client back after its bucket
            # refilled, most clients of a rate limiter, made acquire cost 2.2 us against
            # 1.2 us for a live bucket that way (compiled, timeit).
            old_value = target.value
            target.value = value
            target.deadline = deadline
            target.ttl = deadline - now
            self._writes += 1
            if lapsed is None:
                self._replacements += 1
                cause = REPLACED
            else:
                self._to_end(key)
                self._expirations += 1
                cause = EXPIRED
            if self._on_remove is not None:
                self._pending.append((key, old_value, cause))
        else:
            if lapsed is not None:
                drop_expired(self, lapsed)
            compute_write(self, key, value, plan, now, weight)
    elif op != KEEP and entry is not None:  # REMOVE
        del self._data[key]
        removed(self, entry, DELETED)
    return result


def compute_write(self: StoreCore, key: K, value: V, plan: Plan, now: float, weight: float) -> None:
    deadline = plan.deadline
    if deadline is None:
        ttl = self._ttl if plan.ttl is DEFAULT_TTL else plan.ttl
        write(self, key, value, ttl, weight, False)
    elif deadline > now:
        # The entry's own TTL (what sliding and touch() renew) is the time it was given.
        write(self, key, value, deadline - now, weight, False, deadline)
    else:
        entry = self._lookup(key)
        if entry is not None:
            del self._data[key]
            removed(self, entry, EXPIRED)
