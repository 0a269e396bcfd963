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

import contextlib
import logging
import threading
import time
import weakref
from types import TracebackType
from typing import TYPE_CHECKING

from ttlstore._sweeping import Expirable, Handles, SweeperBase, SweeperStats, Tick

if TYPE_CHECKING:
    import asyncio

__all__ = ["AsyncSweeper", "Expirable", "Sweeper", "SweeperStats"]

logger = logging.getLogger("ttlstore")


# ---------------------------------------------------------------------- thread


def _sweep_on_thread(tick: Tick, stop: threading.Event | None) -> int:
    """Drive one tick on the calling thread; return the entries reclaimed (0 if stopped)."""
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


def _thread_main(handles: Handles, stop: threading.Event) -> None:
    """Body of the sweeper thread: tick, wait ``interval`` or until stopped, repeat.

    Holds the sweeper only weakly while waiting, so no reference cycle through the thread keeps
    a forgotten sweeper (and its thread) alive forever.
    """
    while not stop.is_set():
        tick = handles.tick()
        if tick is None:
            return
        try:
            _sweep_on_thread(tick(), stop)
        except Exception:
            # A fault outside any one store (a bug here): log, count, and keep the thread alive.
            logger.exception("sweeper: tick failed")
            count_error = handles.count_error()
            if count_error is not None:
                count_error()
        del tick
        if stop.wait(handles.interval):
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


class Sweeper(SweeperBase):
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
                args=(Handles(self._tick, self._count_error, self._interval), stop),
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
        return _sweep_on_thread(self._tick(), None)

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


async def _sweep_on_loop(tick: Tick) -> int:
    """Drive one tick on the running loop, yielding to it between slices; return entries."""
    import asyncio  # here, not at the top: `import ttlstore` must not load asyncio

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


async def _task_main(handles: Handles) -> None:
    """Body of the sweeper task: tick, sleep ``interval``, repeat until cancelled.

    Holds the sweeper only weakly while sleeping, like the thread does.
    """
    import asyncio  # here, not at the top: `import ttlstore` must not load asyncio

    while True:
        tick = handles.tick()
        if tick is None:
            return
        try:
            await _sweep_on_loop(tick())
        except Exception:
            logger.exception("sweeper: tick failed")
            count_error = handles.count_error()
            if count_error is not None:
                count_error()
        del tick
        await asyncio.sleep(handles.interval)


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


class AsyncSweeper(SweeperBase):
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
        import asyncio  # here, not at the top: `import ttlstore` must not load asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncSweeper.start() needs a running event loop; call it from async code"
            ) from None
        if self.running:
            raise RuntimeError(f"{self!r} is already running; await stop() first")
        task = loop.create_task(
            _task_main(Handles(self._tick, self._count_error, self._interval)),
            name="ttlstore-async-sweeper",
        )
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
        import asyncio  # here, not at the top: `import ttlstore` must not load asyncio

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
        return await _sweep_on_loop(self._tick())

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
