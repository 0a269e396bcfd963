"""The expiry index of a TTLStore: which entries are due, found without scanning.

Entries written with the store's default TTL get deadlines in non-decreasing order, so a FIFO
queue holds them at O(1) per deadline. Entries with any other TTL go to a binary heap. Both use
lazy deletion: removing an entry from the store leaves its item behind as *stale*, skipped when it
surfaces and dropped wholesale by :meth:`DeadlineIndex.discard` once stale items outnumber live
ones, so the index never holds more than about twice the indexed entries.

Each live entry with a finite deadline has exactly one item, filed under ``entry.filed``, and
``entry.filed <= entry.deadline`` always holds. A deadline may therefore move later in place (a
sliding read, an overwrite with a later deadline) at O(1): the item surfaces early and is re-filed
then. A deadline that moves earlier needs a new entry object and a new item.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, MutableMapping
from typing import Any, Final, TypeAlias

# Keys and values as the compiled core sees them. The core is not Generic: mypyc gives a
# Generic class a __dict__ and a weak-reference slot, which costs every entry 16 bytes and
# which CPython 3.11's collector mis-traverses (a weak reference to such an object crashed it).
# TTLStore declares the typed API.
K: TypeAlias = Any
V: TypeAlias = Any

INF: Final = float("inf")

# Stale items tolerated beyond the live count before a rebuild, so that tiny stores do not
# rebuild on every delete.
_COMPACT_SLACK: Final = 32

# Once this many items were popped one by one in a single unbounded sweep, filtering the rest of
# the heap in one pass and re-heapifying is cheaper than going on popping (heappop costs
# O(log n) Python-level comparisons; the filter is one C-speed pass).
_BULK_MIN: Final = 64


class Entry:
    """One stored item: the only per-entry object a store allocates."""

    __slots__ = ("deadline", "filed", "key", "ttl", "value")

    def __init__(
        self, key: K, value: V, deadline: float, ttl: float | None, filed: float | None = None
    ) -> None:
        self.key = key
        self.value = value
        self.deadline = deadline
        # The deadline under which this entry's index item is filed; None while not indexed.
        self.filed = filed
        # The entry's own TTL, which a sliding read or a touch() renews.
        self.ttl = ttl


class DeadlineIndex:
    """FIFO + binary heap of entry deadlines, with lazy deletion and compaction.

    Filing is O(1) for entries with the default TTL and O(log n) otherwise; reclaiming k due
    entries is O(k) for FIFO entries and O(k log n) for heap entries. Memory is at most about
    twice the number of indexed entries, plus a small constant.
    """

    __slots__ = ("_default_ttl", "fifo", "heap", "stale")

    def __init__(self, default_ttl: float | None) -> None:
        self._default_ttl = default_ttl
        # Public for the store's write path, which checks the FIFO's head inline. Both are
        # only ever changed in place, so a reference taken by the store stays valid.
        self.fifo: deque[Entry] = deque()
        self.heap: list[tuple[float, int, Entry]] = []
        self.stale = 0

    def __len__(self) -> int:
        """Number of items held, stale ones included. O(1)."""
        return len(self.fifo) + len(self.heap)

    def file(self, entry: Entry) -> None:
        """Index ``entry`` under its current (finite) deadline. O(1) FIFO, O(log n) heap."""
        deadline = entry.deadline
        entry.filed = deadline
        fifo = self.fifo
        # The FIFO only stays sorted for default-TTL deadlines; a longer per-entry TTL at its
        # back would push every later default-TTL entry onto the heap.
        if entry.ttl == self._default_ttl and (not fifo or fifo[-1].filed <= deadline):  # type: ignore[operator]
            fifo.append(entry)
        else:
            # id() breaks ties without comparing entries; it is unique because the tuple keeps
            # its entry alive.
            heapq.heappush(self.heap, (deadline, id(entry), entry))

    def due(self, now: float) -> bool:
        """Whether any item is filed at or before ``now``. O(1)."""
        fifo = self.fifo
        heap = self.heap
        return bool((fifo and fifo[0].filed <= now) or (heap and heap[0][0] <= now))  # type: ignore[operator]

    def discard(self, entry: Entry, data: Mapping[K, Entry]) -> None:
        """Record that indexed ``entry`` left ``data``; rebuild if stale items dominate.

        Amortized O(1): a rebuild costs O(n) and follows at least n/2 discards.
        """
        fifo = self.fifo
        if fifo and fifo[0] is entry:
            # Evicting the LRU entry of a store that is written more than read hits the
            # FIFO's head: drop it now rather than leave it stale.
            fifo.popleft()
            return
        self.stale += 1
        if 2 * self.stale > len(self.fifo) + len(self.heap) + _COMPACT_SLACK:
            self._compact(data)

    def count_due(self, now: float, data: Mapping[K, Entry]) -> int:
        """How many entries of ``data`` are due at ``now``, changing nothing.

        Visits only items filed at or before ``now``: the FIFO's sorted prefix and the heap's
        subtree of such items (a heap item's children are filed no earlier). O(1) when nothing
        is due, O(k) for k such items.
        """
        due = 0
        for entry in self.fifo:
            if entry.filed > now:  # type: ignore[operator]
                break
            if entry.deadline <= now and data.get(entry.key) is entry:
                due += 1
        heap = self.heap
        stack = [0] if heap and heap[0][0] <= now else []
        size = len(heap)
        while stack:
            i = stack.pop()
            entry = heap[i][2]
            if entry.deadline <= now and data.get(entry.key) is entry:
                due += 1
            stack.extend(c for c in (2 * i + 1, 2 * i + 2) if c < size and heap[c][0] <= now)
        return due

    def clear(self) -> None:
        """Forget every item. O(n)."""
        self.fifo.clear()
        self.heap.clear()
        self.stale = 0

    def pop_due(self, now: float, limit: int | None, data: MutableMapping[K, Entry]) -> list[Entry]:
        """Delete from ``data`` and return up to ``limit`` live entries due at ``now``.

        Stale items met on the way are dropped and do not count. O(k) for FIFO entries,
        O(k log n) for heap entries.
        """
        due: list[Entry] = []
        take = due.append
        budget = len(self) if limit is None else limit
        fifo = self.fifo
        # The FIFO loop is _settle() written out: this is the per-entry cost of a sweep.
        while fifo:
            entry = fifo[0]
            if entry.filed > now:  # type: ignore[operator]
                break
            fifo.popleft()
            key = entry.key
            if data.get(key) is not entry:
                self.stale -= 1
            elif entry.deadline <= now:
                del data[key]
                take(entry)
                if len(due) >= budget:
                    return due
            else:
                self._refile(entry)
        heap = self.heap
        popped = 0
        while heap and heap[0][0] <= now and len(due) < budget:
            if limit is None and popped >= _BULK_MIN and popped * 8 >= len(heap):
                self._pop_due_bulk(now, data, due)
                break
            entry = heapq.heappop(heap)[2]
            popped += 1
            self._settle(entry, now, data, due)
        return due

    def _settle(
        self,
        entry: Entry,
        now: float,
        data: MutableMapping[K, Entry],
        due: list[Entry],
    ) -> None:
        """Decide the fate of an item just taken off the index."""
        if data.get(entry.key) is not entry:
            self.stale -= 1
        elif entry.deadline <= now:
            del data[entry.key]
            due.append(entry)
        else:
            self._refile(entry)

    def _refile(self, entry: Entry) -> None:
        """File again a live entry whose deadline moved later since it was filed."""
        if entry.deadline == INF:
            entry.filed = None  # overwritten in place with no expiry: nothing to index
        else:
            self.file(entry)

    def _pop_due_bulk(self, now: float, data: MutableMapping[K, Entry], due: list[Entry]) -> None:
        """Take every due heap item in one pass and re-heapify the rest. O(n)."""
        heap = self.heap
        ripe = [item for item in heap if item[0] <= now]
        heap[:] = [item for item in heap if item[0] > now]
        heapq.heapify(heap)
        ripe.sort()
        for item in ripe:
            self._settle(item[2], now, data, due)

    def _compact(self, data: Mapping[K, Entry]) -> None:
        """Drop every stale item. O(n)."""
        live = [e for e in self.fifo if data.get(e.key) is e]
        self.fifo.clear()
        self.fifo.extend(live)
        self.heap[:] = [item for item in self.heap if data.get(item[2].key) is item[2]]
        heapq.heapify(self.heap)
        self.stale = 0

    def debug_items(self) -> list[Any]:
        """Every item currently held (for tests and diagnostics). O(n)."""
        return [*self.fifo, *(item[2] for item in self.heap)]
