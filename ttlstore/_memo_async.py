"""The asyncio half of :mod:`ttlstore.memo`: single flight over tasks, and refresh tasks.

Imported only when an ``async def`` is cached or :func:`ttlstore.memo.aget_or_set` runs, so
``import ttlstore`` stays free of asyncio.

A flight belongs to the event loop it was started on: its computation is a task of that loop,
and only tasks of that loop await it (flights are kept by key *and* loop). Each caller awaits
a future of its own that the task resolves when it lands, so cancelling one caller never
cancels the task; the last caller to be cancelled cancels it, which is the only way the
computation ever sees ``CancelledError`` from this module. Tasks of another loop (another
thread, or a later loop) share a flight of their own: two loops missing one key at once make
one call each, and no future ever crosses loops.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from ttlstore._memo_state import Memo
    from ttlstore.store import TTLStore

K = TypeVar("K")
V = TypeVar("V")

_MISSING: Any = object()


class Flight:
    """One computation of a key on one event loop, awaited by that loop's tasks that missed it."""

    __slots__ = ("discard", "loop", "task", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None
        # One future per waiting caller, resolved when the task lands. A caller's cancellation
        # cancels only its own future, never the task.
        self.waiters: set[asyncio.Future[Any]] = set()
        # Set by an invalidation while in flight: waiters get the result, the store does not.
        self.discard = False


Compute = Callable[[Flight], Coroutine[Any, Any, Any]]


class Flights:
    """The flights of one cache, by key and event loop; safe to share between threads."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._flights: dict[tuple[Hashable, asyncio.AbstractEventLoop], Flight] = {}
        self._prune_at = 64

    def discard(self, key: Hashable) -> None:
        with self._lock:
            for (flight_key, _), flight in self._flights.items():
                if flight_key == key:
                    flight.discard = True

    def discard_all(self) -> None:
        with self._lock:
            for flight in self._flights.values():
                flight.discard = True

    async def run(self, key: Hashable, compute: Compute) -> Any:
        """Await the one computation of ``key`` on this loop, starting it if there is none."""
        loop = asyncio.get_running_loop()
        slot = (key, loop)
        with self._lock:
            flight = self._flights.get(slot)
            if flight is None:
                self._prune()
                flight = self._flights[slot] = Flight(loop)
                started = flight.task = loop.create_task(compute(flight))
                started.add_done_callback(functools.partial(self._landed, slot, flight))
        running = flight.task
        assert running is not None
        task: asyncio.Task[Any] = running
        if task is asyncio.current_task():
            raise RuntimeError(
                f"{self._name}() asked for its own key {key!r} while computing it "
                "(recursion through a cached function would wait on itself)"
            )
        waiter = loop.create_future()
        flight.waiters.add(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            flight.waiters.discard(waiter)
            if not task.done() and not flight.waiters:
                # Every waiter is gone: nobody wants the result. Later callers start anew.
                with self._lock:
                    if self._flights.get(slot) is flight:
                        del self._flights[slot]
                task.cancel()
            raise

    def _prune(self) -> None:
        """Forget flights of closed loops (their tasks never land), once the table has grown."""
        if len(self._flights) >= self._prune_at:
            for slot in [slot for slot in self._flights if slot[1].is_closed()]:
                del self._flights[slot]
            self._prune_at = max(64, 2 * len(self._flights))

    def _landed(
        self,
        slot: tuple[Hashable, asyncio.AbstractEventLoop],
        flight: Flight,
        task: asyncio.Task[Any],
    ) -> None:
        with self._lock:
            if self._flights.get(slot) is flight:
                del self._flights[slot]
        cancelled = task.cancelled()
        error = None if cancelled else task.exception()  # retrieved, whoever waits
        for waiter in flight.waiters:
            if waiter.done():
                continue
            if cancelled:
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(task.result())
        flight.waiters.clear()


def bind_miss(memo: Memo) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The miss path of one cached ``async def``."""
    flights = memo.async_flights = Flights(memo.name)
    func = memo.func
    stale_mode = memo.stale is not None

    async def compute(
        key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any], flight: Flight
    ) -> Any:
        # The store may hold what the hot path did not see: a value written by hand, one the
        # front index let go, or a flight's that landed just before this claim.
        found, value, _ = memo.lookup(key, count=False)
        if not found:
            value = await func(*args, **kwargs)
            if not flight.discard:
                memo.write(key, value)
        return value

    async def miss(key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if memo.recent:
            memo.drain()
        if stale_mode:  # the hot path cannot tell a stale entry: look here
            try:
                found, value, stale = memo.lookup(key)
            except TypeError as exc:
                raise memo.unhashable(exc, key) from None
            if found:
                if stale and memo.claim_refresh(key):
                    loop = asyncio.get_running_loop()
                    task = loop.create_task(_refresh(memo, key, args, kwargs))
                    _background.add(task)
                    task.add_done_callback(_background.discard)
                    memo.refresh_started(key, task)
                return value
        memo.count_miss()
        return await flights.run(key, functools.partial(compute, key, args, kwargs))

    return miss


# Refresh tasks are referenced here while they run: the loop holds tasks only weakly.
_background: set[asyncio.Task[None]] = set()


async def _refresh(memo: Memo, key: Hashable, args: tuple[Any, ...], kwargs: Any) -> None:
    error: BaseException | None = None
    try:
        memo.write(key, await memo.func(*args, **kwargs))
    except asyncio.CancelledError:
        raise  # the loop is shutting down: no failure, a later read may refresh again
    except Exception as exc:
        error = exc
    finally:
        memo.refresh_done(key, error)


# ---------------------------------------------------------------------- aget_or_set

# Flights of aget_or_set, per store, by id(): a TTLStore is a mapping, hence unhashable. The
# weakref callback drops a store's flights when it dies, before its id() can be reused.
_store_flights: dict[int, tuple[weakref.ref[Any], Flights]] = {}
# Reentrant: a collection during _flights_of (it allocates) may run _forget_store here.
_store_lock = threading.RLock()


def _forget_store(ident: int, ref: weakref.ref[Any]) -> None:
    with _store_lock:
        entry = _store_flights.get(ident)
        if entry is not None and entry[0] is ref:
            del _store_flights[ident]


def _flights_of(store: TTLStore[Any, Any]) -> Flights:
    ident = id(store)
    with _store_lock:
        entry = _store_flights.get(ident)
        if entry is None:
            ref = weakref.ref(store, functools.partial(_forget_store, ident))
            entry = _store_flights[ident] = (ref, Flights("aget_or_set"))
        return entry[1]


async def get_or_set(
    store: TTLStore[K, V],
    key: K,
    factory: Callable[[], Awaitable[V]],
    write: Callable[[V], object],
) -> V:
    """The body of :func:`ttlstore.memo.aget_or_set` (arguments already checked)."""
    value = store.get(key, _MISSING)
    if value is not _MISSING:
        return cast(V, value)

    async def compute(flight: Flight) -> V:
        found = store.peek(key, _MISSING)
        if found is not _MISSING:
            return cast(V, found)
        awaitable = factory()
        if not inspect.isawaitable(awaitable):
            raise TypeError(
                f"aget_or_set factory must return an awaitable, got {awaitable!r}; "
                "use TTLStore.get_or_set for a plain function"
            )
        result = await awaitable
        if not flight.discard:
            write(result)
        return result

    return await _flights_of(store).run(key, compute)  # type: ignore[no-any-return]
