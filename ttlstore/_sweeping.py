"""The shared part of both sweepers: store registry, counters, and one tick as a generator.

:mod:`ttlstore.sweeper` drives ticks on a thread (:class:`~ttlstore.sweeper.Sweeper`) or on an
asyncio task (:class:`~ttlstore.sweeper.AsyncSweeper`); see that module for the guarantees.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from ttlstore._checks import positive_int, positive_seconds

__all__ = ["Expirable", "Handles", "SweeperBase", "SweeperStats", "Tick"]

logger = logging.getLogger("ttlstore")


class Expirable(Protocol):
    """Anything a sweeper can serve: ``TTLStore`` or any weak-referenceable look-alike.

    ``expire(limit)`` reclaims at most ``limit`` due entries, atomically with respect to the
    store's readers, and returns how many it reclaimed.
    """

    def expire(self, limit: int, /) -> int:
        """Reclaim up to ``limit`` due entries; return how many were reclaimed."""
        ...


@dataclass(frozen=True, slots=True)
class SweeperStats:
    """An immutable snapshot of a sweeper's counters."""

    ticks: int
    """Ticks completed (a tick cut short by ``stop()`` is not counted)."""
    reclaimed: int
    """Entries reclaimed in total, over all stores, including stores since dropped."""
    errors: int
    """Exceptions caught and logged; each one cost at most one store one tick."""
    last_tick_duration: float
    """Seconds the last completed tick took; 0.0 before the first."""
    per_store: Mapping[int, int] = field(hash=False)
    """``id(store) -> entries reclaimed`` for each store still served (dead stores drop out)."""
    last_tick_time: float = 0.0
    """Wall-clock time (``time.time()``) at which the last completed tick ended; 0.0 before."""
    last_tick_longest_slice: float = 0.0
    """Seconds the longest ``expire`` call of the last completed tick took: the longest a
    reader could have waited behind the sweeper (one lock hold, plus waiting for the lock)."""


class _Served:
    """One served store: a weak reference and what has been reclaimed from it."""

    __slots__ = ("reclaimed", "ref")

    def __init__(self, ref: weakref.ref[Expirable]) -> None:
        self.ref = ref
        self.reclaimed = 0


class SweeperBase:
    """Store registry, counters and the tick itself, shared by both sweepers."""

    def __init__(self, *stores: Expirable, interval: float = 60.0, batch: int = 1000) -> None:
        # TIMEOUT_MAX: a longer wait makes threading.Event.wait raise OverflowError on the thread.
        self._interval = positive_seconds("interval", interval, threading.TIMEOUT_MAX)
        self._batch = positive_int("batch", batch)
        # Guards the registry and the counters; never held while a store is called.
        self._state = threading.Lock()
        # Keyed by id(store): ids are unique among live objects, and a dead store's slot is
        # pruned before any new store is registered, so a reused id never inherits counts.
        self._slots: dict[int, _Served] = {}
        self._ticks = 0
        self._reclaimed = 0
        self._errors = 0
        self._last_tick_duration = 0.0
        self._last_tick_time = 0.0
        self._last_tick_longest_slice = 0.0
        for store in stores:
            self.add(store)

    # ------------------------------------------------------------------ registry

    def add(self, store: Expirable) -> None:
        """Serve ``store`` too, from the next tick on; adding a served store again does nothing.

        The sweeper keeps only a weak reference: it never keeps ``store`` alive. O(stores).
        """
        if not callable(getattr(store, "expire", None)):
            raise TypeError(f"store must have an expire(limit) method, got {store!r}")
        self._check_store(store)
        try:
            ref: weakref.ref[Expirable] = weakref.ref(store)
        except TypeError:
            raise TypeError(f"store must be weak-referenceable, got {store!r}") from None
        with self._state:
            self._prune()
            self._slots.setdefault(id(store), _Served(ref))

    def discard(self, store: Expirable) -> None:
        """Stop serving ``store`` (before the next store of a tick in progress); else no-op."""
        with self._state:
            slot = self._slots.get(id(store))
            if slot is not None and slot.ref() is store:
                del self._slots[id(store)]

    @property
    def stores(self) -> tuple[Expirable, ...]:
        """The stores still alive and served, as a snapshot (strong references). O(stores)."""
        with self._state:
            self._prune()
            return tuple(s for s in (slot.ref() for slot in self._slots.values()) if s is not None)

    def __contains__(self, store: object) -> bool:
        slot = self._slots.get(id(store))
        return slot is not None and slot.ref() is store

    @property
    def interval(self) -> float:
        """Seconds between the end of one tick and the start of the next."""
        return self._interval

    @property
    def batch(self) -> int:
        """The most entries one ``expire`` call (one hold of a store's lock) may reclaim."""
        return self._batch

    def stats(self) -> SweeperStats:
        """An immutable snapshot of the counters. O(stores)."""
        with self._state:
            self._prune()
            per_store = {key: slot.reclaimed for key, slot in self._slots.items()}
            return SweeperStats(
                ticks=self._ticks,
                reclaimed=self._reclaimed,
                errors=self._errors,
                last_tick_duration=self._last_tick_duration,
                last_tick_time=self._last_tick_time,
                last_tick_longest_slice=self._last_tick_longest_slice,
                per_store=MappingProxyType(per_store),
            )

    def _check_store(self, store: Expirable) -> None:
        """Refuse a store this kind of sweeper cannot serve safely (hook for subclasses)."""

    def _prune(self) -> None:
        """Drop the slots of dead stores, so counters never outlive their store. Under _state."""
        dead = [key for key, slot in self._slots.items() if slot.ref() is None]
        for key in dead:
            del self._slots[key]

    # ------------------------------------------------------------------ the tick

    def _tick(self) -> Generator[bool, None, int]:
        """One tick as a generator that pauses between slices; returns the entries reclaimed.

        It yields True between two slices of one store (that store's lock was just released and
        more may be due) and False between two stores. The drivers decide what a pause means:
        the thread checks for stop and lets readers at the lock, the task gives the event loop a
        turn (and a chance to cancel). A store's failure is logged and counted and the tick goes
        on with the next store. O(k log n) for k due entries, in ceil(k / batch) + 1 calls per
        store.
        """
        started = time.perf_counter()
        batch = self._batch
        total = 0
        longest = 0.0
        with self._state:
            self._prune()
            slots = list(self._slots.items())
        for key, slot in slots:
            if self._slots.get(key) is not slot:
                continue  # discarded during this tick
            store = slot.ref()
            if store is None:
                continue
            reclaimed = 0
            try:
                while True:
                    slice_started = time.perf_counter()
                    n = store.expire(batch)
                    longest = max(longest, time.perf_counter() - slice_started)
                    reclaimed += n
                    if n < batch:
                        break
                    # A full slice: more may be due. The store's lock is free right now.
                    yield True
            except Exception:
                logger.exception("sweeper: reclaiming due entries of %r failed", store)
                with self._state:
                    self._errors += 1
            finally:
                # Also on stop/cancel mid-store: what was reclaimed stays counted.
                with self._state:
                    slot.reclaimed += reclaimed
                    self._reclaimed += reclaimed
                total += reclaimed
            del store  # not held across the yield below, nor between ticks
            yield False
        with self._state:
            self._ticks += 1
            self._last_tick_duration = time.perf_counter() - started
            self._last_tick_time = time.time()
            self._last_tick_longest_slice = longest
        return total

    def _count_error(self) -> None:
        """Count a fault caught outside any one store."""
        with self._state:
            self._errors += 1


Tick = Generator[bool, None, int]


class Handles:
    """What a sweeper's thread or task needs of it, each held weakly between ticks.

    Bound methods through ``weakref.WeakMethod``: no reference cycle through the thread or
    task keeps a forgotten sweeper alive, and no module-level code reaches into its privates.
    """

    __slots__ = ("count_error", "interval", "tick")

    def __init__(
        self, tick: Callable[[], Tick], count_error: Callable[[], None], interval: float
    ) -> None:
        self.tick = weakref.WeakMethod(tick)
        self.count_error = weakref.WeakMethod(count_error)
        self.interval = interval
