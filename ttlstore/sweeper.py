"""Background sweepers: reclaim due entries of any number of stores, on a thread or on asyncio.

Lazy expiry alone leaves memory held by keys that are never read again. A sweeper calls
``store.expire(batch)`` on every store it serves, once per ``interval``, until a call reclaims
fewer than ``batch`` entries. Each call holds the store's lock once, and the sweeper pauses
between calls, so a reader waits behind one slice of ``batch`` entries, never behind the whole
backlog (``threading.Lock`` is not fair: a starved machine can still let a slice or two jump
the queue, but the lock is free between any two slices).

:class:`Sweeper` runs the ticks on one daemon thread, :class:`AsyncSweeper` on one asyncio task
of the running loop (store work then stays on the loop's thread, so it also serves stores built
with ``threadsafe=False`` that only that loop uses).

Both hold their stores through weak references, and their thread or task holds the sweeper
itself only weakly between ticks: dropping the last reference to a running sweeper stops it
(with a warning on logger ``ttlstore``) instead of leaking a thread that nobody can stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Protocol

from ttlstore._checks import positive_int, positive_seconds

__all__ = ["AsyncSweeper", "Expirable", "Sweeper", "SweeperStats"]

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


class _Slot:
    """One served store: a weak reference and what has been reclaimed from it."""

    __slots__ = ("reclaimed", "ref")

    def __init__(self, ref: weakref.ref[Expirable]) -> None:
        self.ref = ref
        self.reclaimed = 0


class _SweeperBase:
    """Store registry, counters and the tick itself, shared by both sweepers."""

    def __init__(self, *stores: Expirable, interval: float = 60.0, batch: int = 1000) -> None:
        # TIMEOUT_MAX: a longer wait makes threading.Event.wait raise OverflowError on the thread.
        self._interval = positive_seconds("interval", interval, threading.TIMEOUT_MAX)
        self._batch = positive_int("batch", batch)
        # Guards the registry and the counters; never held while a store is called.
        self._state = threading.Lock()
        # Keyed by id(store): ids are unique among live objects, and a dead store's slot is
        # pruned before any new store is registered, so a reused id never inherits counts.
        self._slots: dict[int, _Slot] = {}
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
            self._slots.setdefault(id(store), _Slot(ref))

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
                per_store=MappingProxyType(per_store),
                last_tick_time=self._last_tick_time,
                last_tick_longest_slice=self._last_tick_longest_slice,
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


# ---------------------------------------------------------------------- thread


def _sweep_on_thread(sweeper: Sweeper, stop: threading.Event | None) -> int:
    """Drive one tick on the calling thread; return the entries reclaimed (0 if stopped)."""
    tick = sweeper._tick()
    try:
        while True:
            between_slices = next(tick)
            if stop is not None and stop.is_set():
                return 0
            if between_slices:
                # Pause so that a reader blocked on the store's lock takes it before this thread
                # comes back for the next slice. Measured: without it CPython's lock and GIL
                # hand-offs let this thread re-acquire first, and a busy reader waits behind
                # 5-18 slices; with it, behind at most one (while the machine is not starved).
                time.sleep(0)
    except StopIteration as done:
        total: int = done.value
        return total
    finally:
        tick.close()


def _thread_main(ref: weakref.ref[Sweeper], stop: threading.Event) -> None:
    """Body of the sweeper thread: tick, wait ``interval`` or until stopped, repeat.

    Holds the sweeper only weakly while waiting, so no reference cycle through the thread keeps
    a forgotten sweeper (and its thread) alive forever.
    """
    while not stop.is_set():
        sweeper = ref()
        if sweeper is None:
            return
        interval = sweeper.interval
        try:
            _sweep_on_thread(sweeper, stop)
        except Exception:
            # A fault outside any one store (a bug here): log, count, and keep the thread alive.
            logger.exception("sweeper: tick failed")
            sweeper._count_error()
        del sweeper
        if stop.wait(interval):
            return


def _abandoned(stop: threading.Event, kind: str) -> None:
    """Finalizer of a running sweeper that was garbage-collected: stop it, and say so."""
    if not stop.is_set():
        stop.set()
        logger.warning(
            "%s was garbage-collected while running and has stopped; "
            "keep a reference to it and call stop() (or use it as a context manager)",
            kind,
        )


class Sweeper(_SweeperBase):
    """Reclaims due entries of any number of stores every ``interval`` seconds, on one thread.

    ``Sweeper(*stores, interval=60.0, batch=1000)``; ``start()``/``stop()`` or ``with``. Each tick
    runs right after ``start()`` and then ``interval`` seconds after the previous one ended; it
    reclaims every due entry of every store in slices of at most ``batch``, releasing the
    store's lock between slices. An exception from a store is logged on logger ``ttlstore``,
    counted in ``stats().errors``, and the sweeper goes on. The thread is a daemon: it never
    holds up interpreter exit.

    Stores must be thread-safe (``TTLStore``'s default), since the thread calls them
    concurrently with their users. Keep a reference to a running sweeper: one that is
    garbage-collected stops, with a warning.
    """

    def __init__(self, *stores: Expirable, interval: float = 60.0, batch: int = 1000) -> None:
        super().__init__(*stores, interval=interval, batch=batch)
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._finalizer: weakref.finalize[[threading.Event, str], Sweeper] | None = None
        # Serialises start() and stop(), so two racing start() calls cannot both launch.
        self._lifecycle = threading.Lock()

    def _check_store(self, store: Expirable) -> None:
        # A store without a lock would race with its users on this sweeper's thread.
        if getattr(store, "threadsafe", True) is False:
            raise ValueError(
                f"store {store!r} is not thread-safe and Sweeper calls it from its own thread; "
                "use threadsafe=True, or an AsyncSweeper on the event loop that owns the store"
            )

    @property
    def running(self) -> bool:
        """True from ``start()`` until ``stop()`` (or until the thread has ended)."""
        stop, thread = self._stop, self._thread
        return stop is not None and not stop.is_set() and thread is not None and thread.is_alive()

    def start(self) -> None:
        """Start the sweeper thread; ``RuntimeError`` if it is already running. O(1)."""
        with self._lifecycle:
            if self.running:
                raise RuntimeError(f"{self!r} is already running; call stop() first")
            stop = threading.Event()
            thread = threading.Thread(
                target=_thread_main,
                args=(weakref.ref(self), stop),
                name="ttlstore-sweeper",
                daemon=True,
            )
            finalizer = weakref.finalize(self, _abandoned, stop, "Sweeper")
            finalizer.atexit = False  # at interpreter exit the daemon thread just ends
            self._stop, self._thread, self._finalizer = stop, thread, finalizer
            thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread and wait up to ``timeout`` seconds (``None``: as long as it takes).

        The thread wakes at once from its wait; mid-tick it stops after the current slice.
        Returns True once the thread has ended (also when it was not running: a no-op).
        Called from the sweeper's own thread (say, from an ``on_remove`` callback), it only
        asks the thread to stop. Returns within one slice of ``batch`` entries.
        """
        with self._lifecycle:
            stop, thread, finalizer = self._stop, self._thread, self._finalizer
            self._stop = self._thread = self._finalizer = None
        if finalizer is not None:
            finalizer.detach()
        if stop is None or thread is None:
            return True
        stop.set()
        if thread is threading.current_thread():
            return False  # joining ourselves would raise; the loop ends when this tick returns
        thread.join(timeout)
        return not thread.is_alive()

    def sweep(self) -> int:
        """Run one tick now, on the calling thread; return the entries reclaimed.

        Works whether or not the sweeper is running. Store errors are logged and counted,
        not raised, exactly as on the thread. O(k log n) for k due entries of a store of n, in
        ceil(k / batch) + 1 lock holds per store.
        """
        return _sweep_on_thread(self, None)

    def __enter__(self) -> Sweeper:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<Sweeper stores={len(self._slots)} interval={self._interval:g} "
            f"batch={self._batch} running={self.running}>"
        )


# ---------------------------------------------------------------------- asyncio


async def _sweep_on_loop(sweeper: AsyncSweeper) -> int:
    """Drive one tick on the running loop, yielding to it between slices; return entries."""
    tick = sweeper._tick()
    try:
        while True:
            next(tick)
            # Give the loop a turn between slices; cancellation lands here, between two
            # expire() calls, so it never interrupts a store mid-operation.
            await asyncio.sleep(0)
    except StopIteration as done:
        total: int = done.value
        return total
    finally:
        tick.close()


async def _task_main(ref: weakref.ref[AsyncSweeper]) -> None:
    """Body of the sweeper task: tick, sleep ``interval``, repeat until cancelled.

    Holds the sweeper only weakly while sleeping, like the thread does.
    """
    while True:
        sweeper = ref()
        if sweeper is None:
            return
        interval = sweeper.interval
        try:
            await _sweep_on_loop(sweeper)
        except Exception:
            logger.exception("sweeper: tick failed")
            sweeper._count_error()
        del sweeper
        await asyncio.sleep(interval)


def _abandoned_task(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    """Finalizer of a running AsyncSweeper that was garbage-collected: cancel its task."""
    if task.done():
        return
    logger.warning(
        "AsyncSweeper was garbage-collected while running and has stopped; "
        "keep a reference to it and await stop() (or use it with async with)"
    )
    # Garbage collection may run on any thread; only the loop may touch its task. A closed
    # loop raises RuntimeError: the task is gone with it.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(task.cancel)


class AsyncSweeper(_SweeperBase):
    """Reclaims due entries of any number of stores every ``interval`` seconds, on one task.

    ``AsyncSweeper(*stores, interval=60.0, batch=1000)``; ``start()`` (inside a running loop)
    and ``await stop()``, or ``async with`` — the shape of a FastAPI ``lifespan``. Ticks run
    like :class:`Sweeper`'s, but on the event loop's thread (no executor), yielding to the loop
    between slices. Cancelling the task is honoured at once and stops the sweeper.
    """

    def __init__(self, *stores: Expirable, interval: float = 60.0, batch: int = 1000) -> None:
        super().__init__(*stores, interval=interval, batch=batch)
        self._task: asyncio.Task[None] | None = None
        self._finalizer: (
            weakref.finalize[[asyncio.AbstractEventLoop, asyncio.Task[None]], AsyncSweeper] | None
        ) = None

    @property
    def running(self) -> bool:
        """True from ``start()`` until ``stop()`` or until its task was cancelled."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the sweeper task on the running loop; ``RuntimeError`` if already running.

        Must be called from a coroutine (or callback) of the loop that should run it. O(1).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncSweeper.start() needs a running event loop; call it from async code"
            ) from None
        if self.running:
            raise RuntimeError(f"{self!r} is already running; await stop() first")
        task = loop.create_task(_task_main(weakref.ref(self)), name="ttlstore-async-sweeper")
        if self._finalizer is not None:
            self._finalizer.detach()
        finalizer = weakref.finalize(self, _abandoned_task, loop, task)
        finalizer.atexit = False
        self._task, self._finalizer = task, finalizer

    async def stop(self) -> None:
        """Cancel the task and wait for it to end (at most one slice); no-op if not running.

        ``RuntimeError`` if awaited on another loop than the one that started a running task:
        waiting there could never end.
        """
        task, finalizer = self._task, self._finalizer
        if (
            task is not None
            and not task.done()
            and task.get_loop() is not asyncio.get_running_loop()
        ):
            raise RuntimeError(
                f"{self!r} was started on another event loop; await stop() on that loop"
            )
        self._task = self._finalizer = None
        if finalizer is not None:
            finalizer.detach()
        if task is None:
            return
        if not task.done():
            task.cancel()
            # asyncio.wait neither raises the task's CancelledError nor swallows our own.
            await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            # Unreachable unless a BaseException escaped a tick; surface it, do not drop it.
            logger.error("sweeper task ended with an error", exc_info=task.exception())

    async def sweep(self) -> int:
        """Run one tick now on this loop, yielding between slices; return the entries reclaimed.

        Works whether or not the sweeper is running. Store errors are logged and counted.
        O(k log n) for k due entries of a store of n, in ceil(k / batch) + 1 slices per store.
        """
        return await _sweep_on_loop(self)

    async def __aenter__(self) -> AsyncSweeper:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return (
            f"<AsyncSweeper stores={len(self._slots)} interval={self._interval:g} "
            f"batch={self._batch} running={self.running}>"
        )
