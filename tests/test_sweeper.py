"""Sweeper and AsyncSweeper: background reclamation, slicing, faults, lifecycle, weak references.

Real TTLStores with the fake clock from conftest where the store's behaviour matters; small
duck-typed fake stores (TTLStore cannot be subclassed) for fault injection and slice recording.
No test asserts a wall-clock duration except "stop() returns in well under a second"; waits poll
for a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from ttlstore.store import RemovalCause, TTLStore
from ttlstore.sweeper import AsyncSweeper, Expirable, Sweeper, SweeperStats
from ttlstore.testing import FakeClock

FAST = 0.01  # interval for tests that want many ticks
DEADLINE = 5.0  # generous: only a broken sweeper ever takes this long


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.002)


async def async_wait_for(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """``wait_for`` for coroutines: yields to the loop while polling."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.002)


def filled(
    clock: FakeClock, n: int, *, maxsize: int = 1_000_000, ttl: float = 10.0
) -> TTLStore[Any, int]:
    """A threadsafe store holding ``n`` entries that all fall due ``ttl`` seconds from now."""
    store: TTLStore[Any, int] = TTLStore(maxsize, ttl=ttl, clock=clock)
    for i in range(n):
        store.set(i, i)
    return store


class FakeStore:
    """A store look-alike with ``pending`` due entries; records every ``expire`` call."""

    def __init__(self, pending: int = 0) -> None:
        self.pending = pending
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.fail_next = 0  # how many coming calls raise

    def expire(self, limit: int | None = None) -> int:
        assert limit is not None, "a sweeper must always pass a limit"
        self.calls.append(limit)
        self.threads.add(threading.get_ident())
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected fault")
        n = min(limit, self.pending)
        self.pending -= n
        return n

    def __repr__(self) -> str:
        return f"<FakeStore pending={self.pending}>"


class EndlessStore:
    """Always has a full slice due, as under a flood of short-lived writes."""

    def __init__(self) -> None:
        self.calls = 0

    def expire(self, limit: int | None = None) -> int:
        self.calls += 1
        assert limit is not None
        return limit


# ---------------------------------------------------------------------- validation


def assert_names(error: Exception, argument: str, value: object) -> None:
    """The message says which argument was wrong and what it was given."""
    assert argument in str(error)
    assert repr(value) in str(error)


@pytest.mark.parametrize("cls", [Sweeper, AsyncSweeper])
@pytest.mark.parametrize("interval", [True, "1", None, [1], 1j])
def test_interval_of_wrong_type_is_a_type_error(cls: type[Sweeper], interval: Any) -> None:
    with pytest.raises(TypeError) as caught:
        cls(interval=interval)
    assert_names(caught.value, "interval", interval)


@pytest.mark.parametrize("cls", [Sweeper, AsyncSweeper])
@pytest.mark.parametrize("interval", [0, -1, 0.0, float("nan"), float("inf"), 1e300])
def test_interval_not_positive_finite_is_a_value_error(cls: type[Sweeper], interval: float) -> None:
    with pytest.raises(ValueError) as caught:
        cls(interval=interval)
    assert_names(caught.value, "interval", interval)


@pytest.mark.parametrize("cls", [Sweeper, AsyncSweeper])
@pytest.mark.parametrize("batch", [True, 1.5, 1000.0, "10", None])
def test_batch_of_wrong_type_is_a_type_error(cls: type[Sweeper], batch: Any) -> None:
    with pytest.raises(TypeError) as caught:
        cls(batch=batch)
    assert_names(caught.value, "batch", batch)


@pytest.mark.parametrize("cls", [Sweeper, AsyncSweeper])
@pytest.mark.parametrize("batch", [0, -1])
def test_batch_not_positive_is_a_value_error(cls: type[Sweeper], batch: int) -> None:
    with pytest.raises(ValueError) as caught:
        cls(batch=batch)
    assert_names(caught.value, "batch", batch)


def test_valid_numbers_are_accepted() -> None:
    sweeper = Sweeper(interval=1, batch=1)
    assert sweeper.interval == 1.0
    assert isinstance(sweeper.interval, float)
    assert sweeper.batch == 1


def test_store_without_expire_is_refused() -> None:
    with pytest.raises(TypeError, match="store"):
        Sweeper(object())  # type: ignore[arg-type]


def test_store_that_cannot_be_weakly_referenced_is_refused() -> None:
    class Slotted:
        __slots__ = ()

        def expire(self, limit: int | None = None) -> int:
            return 0

    with pytest.raises(TypeError, match="weak"):
        Sweeper(Slotted())


def test_thread_sweeper_refuses_a_store_that_says_it_is_not_threadsafe() -> None:
    store = FakeStore()
    store.threadsafe = False  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="thread-safe"):
        Sweeper(store)
    AsyncSweeper(store)  # the loop's own thread is fine


# ---------------------------------------------------------------------- acceptance 1: emptying


def test_running_sweeper_empties_two_stores_without_any_read(clock: FakeClock) -> None:
    # Far below maxsize: reclamation never waits for a bound to be crossed.
    first, second = filled(clock, 3_000), filled(clock, 500)
    clock.advance(11)
    with Sweeper(first, second, interval=FAST, batch=1000) as sweeper:
        # Counts are committed per store, the tick at its end: wait for both.
        wait_for(lambda: sweeper.stats().reclaimed == 3_500 and sweeper.stats().ticks >= 1)
        stats = sweeper.stats()
    assert stats.per_store == {id(first): 3_000, id(second): 500}
    assert stats.ticks >= 1
    assert stats.errors == 0
    # The store counts what the sweeper reclaimed as its own expirations.
    assert first.stats().expirations == 3_000
    assert first.stats().size == 0
    assert second.stats().expirations == 500


def test_sweeper_reclaims_only_what_is_due(clock: FakeClock) -> None:
    store: TTLStore[str, int] = TTLStore(100, ttl=10, clock=clock)
    store.set("short", 1, ttl=1)
    store.set("long", 2)
    store.set("forever", 3, ttl=None)
    clock.advance(5)
    sweeper = Sweeper(store)
    assert sweeper.sweep() == 1
    assert store.peek("long") == 2
    assert store.peek("forever") == 3
    clock.advance(5)
    assert sweeper.sweep() == 1
    assert sweeper.sweep() == 0
    assert store.peek("forever") == 3


def test_polling_stats_and_live_count_leaves_every_expiry_to_the_sweeper(clock: FakeClock) -> None:
    """A dashboard polling the store while a sweeper runs: the sweeper still reclaims (and
    counts) every entry that expired, and every poll sees exactly the live entries."""
    store: TTLStore[Any, int] = TTLStore(10_000, ttl=10.0, clock=clock)
    expired_total = 0
    with Sweeper(store, interval=FAST, batch=500) as sweeper:
        for wave in range(5):
            for i in range(1_000):
                store.set((wave, i), i, ttl=None if i % 10 == 0 else 10.0)
            clock.advance(11)  # the wave's 900 entries with a TTL are due now
            expired_total += 900
            live = 100 * (wave + 1)

            def swept(total: int = expired_total, live: int = live) -> bool:
                # Poll the observers the way a metrics scrape does while the sweeper works.
                assert store.live_count() == store.stats().size == live
                return sweeper.stats().reclaimed == total

            wait_for(swept)
            assert store.stats().expirations == expired_total
    assert sweeper.stats().reclaimed == store.stats().expirations == expired_total == 4_500
    assert store.live_count() == len(store) == 500


async def test_async_sweeper_empties_two_stores_without_any_read(clock: FakeClock) -> None:
    first, second = filled(clock, 2_500), filled(clock, 10)
    clock.advance(11)
    async with AsyncSweeper(first, second, interval=FAST, batch=1000) as sweeper:
        await async_wait_for(lambda: sweeper.stats().reclaimed == 2_510)
    assert sweeper.stats().per_store == {id(first): 2_500, id(second): 10}
    assert first.stats().expirations == 2_500


def test_sweep_reclaims_in_slices_of_batch() -> None:
    store = FakeStore(pending=2_500)
    assert Sweeper(store, batch=1000).sweep() == 2_500
    # Two full slices, a partial one, and no call after a partial slice.
    assert store.calls == [1000, 1000, 1000]
    exact = FakeStore(pending=2_000)
    assert Sweeper(exact, batch=1000).sweep() == 2_000
    # A full last slice cannot tell "done" from "more due": one more call answers 0.
    assert exact.calls == [1000, 1000, 1000]


# ---------------------------------------------------------------------- acceptance 2: faults


def test_store_failure_is_logged_counted_and_does_not_stop_the_sweeper(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ttlstore")
    flaky = FakeStore(pending=5_000)
    flaky.fail_next = 1
    healthy = filled(clock, 100)
    clock.advance(11)
    with Sweeper(flaky, healthy, interval=FAST, batch=1000) as sweeper:
        # The next tick reclaims the store that failed.
        wait_for(lambda: flaky.pending == 0)
        # The failing store did not keep the other one from being swept.
        wait_for(lambda: sweeper.stats().per_store.get(id(healthy)) == 100)
        wait_for(lambda: sweeper.stats().ticks >= 2)
        assert sweeper.running
        stats = sweeper.stats()
    assert stats.errors == 1
    assert stats.ticks >= 2
    assert stats.per_store[id(flaky)] == 5_000
    [record] = [r for r in caplog.records if r.name == "ttlstore"]
    assert record.levelno == logging.ERROR
    assert "FakeStore" in record.getMessage()
    assert record.exc_info is not None
    assert "injected fault" in str(record.exc_info[1])


def test_a_store_that_always_fails_never_ends_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ttlstore")
    broken = FakeStore()
    broken.fail_next = 10**9
    other = FakeStore(pending=0)
    with Sweeper(broken, other, interval=FAST) as sweeper:
        wait_for(lambda: sweeper.stats().ticks >= 5)
        assert sweeper.running
    assert sweeper.stats().errors >= 5
    assert len(other.calls) >= 5


async def test_async_store_failure_is_logged_counted_and_does_not_stop_the_sweeper(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ttlstore")
    flaky = FakeStore(pending=3_000)
    flaky.fail_next = 1
    healthy = filled(clock, 100)
    clock.advance(11)
    async with AsyncSweeper(flaky, healthy, interval=FAST, batch=1000) as sweeper:
        await async_wait_for(lambda: flaky.pending == 0)
        await async_wait_for(lambda: sweeper.stats().per_store.get(id(healthy)) == 100)
        assert sweeper.running
    assert sweeper.stats().errors == 1
    [record] = [r for r in caplog.records if r.name == "ttlstore"]
    assert record.exc_info is not None
    assert "injected fault" in str(record.exc_info[1])


def test_manual_sweep_logs_and_counts_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ttlstore")
    broken, fine = FakeStore(pending=10), FakeStore(pending=7)
    broken.fail_next = 1
    sweeper = Sweeper(broken, fine)
    assert sweeper.sweep() == 7
    assert sweeper.stats().errors == 1
    assert sweeper.sweep() == 10
    assert "injected fault" in caplog.text


def test_reclaimed_count_survives_a_failure_mid_store() -> None:
    store = FakeStore(pending=2_500)

    def expire(limit: int | None = None) -> int:
        if store.pending < 2_000:
            raise RuntimeError("injected fault")
        return FakeStore.expire(store, limit)

    store.expire = expire  # type: ignore[method-assign]
    sweeper = Sweeper(store, batch=1000)
    assert sweeper.sweep() == 1_000
    assert sweeper.stats().reclaimed == 1_000
    assert sweeper.stats().errors == 1


# ---------------------------------------------------------------------- acceptance 3: prompt stop


def test_stop_returns_promptly_with_a_long_interval() -> None:
    store = FakeStore()
    sweeper = Sweeper(store, interval=60)
    sweeper.start()
    wait_for(lambda: sweeper.stats().ticks == 1)  # now waiting out the 60 s
    started = time.monotonic()
    assert sweeper.stop() is True
    assert time.monotonic() - started < 0.5
    assert not sweeper.running


def test_stop_interrupts_a_tick_that_would_never_end() -> None:
    endless = EndlessStore()
    sweeper = Sweeper(endless, interval=60)
    sweeper.start()
    wait_for(lambda: endless.calls > 10)
    started = time.monotonic()
    assert sweeper.stop(timeout=DEADLINE) is True
    assert time.monotonic() - started < 0.5
    calls = endless.calls
    time.sleep(0.02)
    assert endless.calls == calls
    assert sweeper.stats().ticks == 0  # a tick cut short is not counted
    assert sweeper.stats().reclaimed == calls * 1000


async def test_async_stop_returns_promptly_with_a_long_interval() -> None:
    sweeper = AsyncSweeper(FakeStore(), interval=60)
    sweeper.start()
    await async_wait_for(lambda: sweeper.stats().ticks == 1)
    started = time.monotonic()
    await sweeper.stop()
    assert time.monotonic() - started < 0.5
    assert not sweeper.running


async def test_async_stop_interrupts_a_tick_that_would_never_end() -> None:
    endless = EndlessStore()
    sweeper = AsyncSweeper(endless, interval=60)
    sweeper.start()
    await async_wait_for(lambda: endless.calls > 10)
    started = time.monotonic()
    await sweeper.stop()
    assert time.monotonic() - started < 0.5
    calls = endless.calls
    await asyncio.sleep(0.02)
    assert endless.calls == calls


# ---------------------------------------------------------------------- lifecycle


def test_second_start_while_running_is_refused_and_restart_after_stop_works() -> None:
    store = FakeStore()
    sweeper = Sweeper(store, interval=FAST)
    assert sweeper.stop() is True  # not running: no-op
    sweeper.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            sweeper.start()
        wait_for(lambda: sweeper.stats().ticks >= 1)
    finally:
        sweeper.stop()
    sweeper.stop()  # twice: still a no-op
    ticks = sweeper.stats().ticks
    with sweeper:
        assert sweeper.running
        wait_for(lambda: sweeper.stats().ticks >= ticks + 2)
    assert not sweeper.running


def test_context_manager_runs_a_daemon_thread_and_ends_it() -> None:
    with Sweeper(FakeStore(), interval=60) as sweeper:
        assert sweeper.running
        [thread] = [t for t in threading.enumerate() if t.name == "ttlstore-sweeper"]
        assert thread.daemon
    assert not thread.is_alive()
    assert not sweeper.running


def test_stop_from_the_sweeper_thread_itself_does_not_deadlock(clock: FakeClock) -> None:
    sweeper: Sweeper | None = None
    answers: list[bool] = []

    def on_remove(key: int, value: int, cause: RemovalCause) -> None:
        # on_remove runs on whichever thread reclaimed the entry: here, the sweeper's.
        assert sweeper is not None
        answers.append(sweeper.stop())

    store: TTLStore[int, int] = TTLStore(10, ttl=1, clock=clock, on_remove=on_remove)
    store.set(1, 1)
    clock.advance(2)
    sweeper = Sweeper(store, interval=FAST)
    sweeper.start()
    wait_for(lambda: answers == [False])  # asked to stop; cannot join itself
    wait_for(lambda: not any(t.name == "ttlstore-sweeper" for t in threading.enumerate()))
    assert not sweeper.running


async def test_async_second_start_refused_stop_noop_and_restart() -> None:
    store = FakeStore()
    sweeper = AsyncSweeper(store, interval=FAST)
    await sweeper.stop()  # not running: no-op
    sweeper.start()
    with pytest.raises(RuntimeError, match="already running"):
        sweeper.start()
    await async_wait_for(lambda: sweeper.stats().ticks >= 1)
    await sweeper.stop()
    await sweeper.stop()
    assert not sweeper.running
    ticks = sweeper.stats().ticks
    async with sweeper:
        await async_wait_for(lambda: sweeper.stats().ticks >= ticks + 2)
    assert not sweeper.running


def test_async_start_outside_a_running_loop_is_a_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="running event loop"):
        AsyncSweeper().start()


async def test_cancelling_the_task_stops_the_sweeper_at_once() -> None:
    endless = EndlessStore()
    sweeper = AsyncSweeper(endless, interval=60)
    sweeper.start()
    await async_wait_for(lambda: endless.calls > 3)
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "ttlstore-async-sweeper"]
    task.cancel()
    await asyncio.wait({task})
    assert task.cancelled()
    assert not sweeper.running
    await sweeper.stop()  # still fine
    sweeper.start()  # and it can start again
    await async_wait_for(lambda: sweeper.running and endless.calls > 20)
    await sweeper.stop()


async def test_cancelling_stop_itself_is_not_swallowed() -> None:
    sweeper = AsyncSweeper(EndlessStore(), interval=60)
    sweeper.start()
    stopper = asyncio.ensure_future(sweeper.stop())
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper


# ---------------------------------------------------------------------- acceptance 4: weak refs


def test_a_sweeper_never_keeps_a_store_alive(clock: FakeClock) -> None:
    store = filled(clock, 10)
    other = filled(clock, 10)
    ref = weakref.ref(store)
    with Sweeper(store, other, interval=60) as sweeper:
        wait_for(lambda: sweeper.stats().ticks == 1)  # the thread is waiting, mid-interval
        del store
        gc.collect()
        assert ref() is None
        assert sweeper.stores == (other,)
        assert set(sweeper.stats().per_store) == {id(other)}


def test_a_dead_store_is_dropped_and_the_others_are_still_served(clock: FakeClock) -> None:
    store = filled(clock, 1_000)
    other = filled(clock, 1_000)
    ref = weakref.ref(store)
    with Sweeper(store, other, interval=FAST, batch=100) as sweeper:
        wait_for(lambda: sweeper.stats().ticks >= 2)
        del store
        # The thread may hold the store for the few microseconds of its own tick.
        wait_for(lambda: gc.collect() >= 0 and ref() is None)
        clock.advance(11)
        wait_for(lambda: sweeper.stats().per_store.get(id(other)) == 1_000)
        assert sweeper.stores == (other,)
        assert sweeper.running
    assert other.stats().expirations == 1_000


async def test_an_async_sweeper_never_keeps_a_store_alive(clock: FakeClock) -> None:
    store = filled(clock, 10)
    other = filled(clock, 10)
    ref = weakref.ref(store)
    async with AsyncSweeper(store, other, interval=FAST) as sweeper:
        await async_wait_for(lambda: sweeper.stats().ticks >= 1)
        del store
        gc.collect()  # the loop is here, not in a tick: nothing else holds the store
        assert ref() is None
        clock.advance(11)
        await async_wait_for(lambda: sweeper.stats().per_store.get(id(other)) == 10)
        assert sweeper.stores == (other,)


def test_per_store_counters_do_not_outlive_their_stores() -> None:
    sweeper = Sweeper()
    keep = FakeStore(pending=3)
    sweeper.add(keep)
    for _ in range(1_000):
        store = FakeStore(pending=5)
        sweeper.add(store)
        sweeper.sweep()
        del store
    stats = sweeper.stats()
    assert stats.per_store == {id(keep): 3}
    assert stats.reclaimed == 3 + 5 * 1_000  # the total keeps what dead stores gave back
    assert len(sweeper._slots) == 1


def test_a_forgotten_running_sweeper_is_collected_and_its_thread_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ttlstore")
    sweeper = Sweeper(FakeStore(), interval=60)
    ref = weakref.ref(sweeper)  # polled through a weak reference, so the test holds none
    sweeper.start()
    wait_for(lambda: (alive := ref()) is not None and alive.stats().ticks == 1)
    thread = sweeper._thread
    assert thread is not None
    del sweeper
    wait_for(lambda: gc.collect() >= 0 and ref() is None)
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert "garbage-collected while running" in caplog.text


async def test_a_forgotten_running_async_sweeper_is_collected_and_its_task_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ttlstore")
    sweeper = AsyncSweeper(FakeStore(), interval=60)
    ref = weakref.ref(sweeper)
    sweeper.start()
    await async_wait_for(lambda: (alive := ref()) is not None and alive.stats().ticks == 1)
    task = sweeper._task
    assert task is not None
    del sweeper
    gc.collect()
    assert ref() is None
    await asyncio.wait({task}, timeout=DEADLINE)
    assert task.done()
    assert "garbage-collected while running" in caplog.text


def test_a_stopped_sweeper_is_not_reported_when_collected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ttlstore")
    with Sweeper(FakeStore(), interval=60) as sweeper:
        pass
    del sweeper
    gc.collect()
    assert "garbage-collected" not in caplog.text


# ---------------------------------------------------------------------- acceptance 5: slicing


class CountingLock:
    """Stands in for a store's lock: counts holds per thread, remembers the order of holders."""

    def __init__(self, inner: threading.Lock) -> None:
        self.inner = inner
        self.holds: dict[int, int] = {}
        self.holders: list[int] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self.inner.acquire(blocking, timeout)
        if got:
            me = threading.get_ident()
            self.holds[me] = self.holds.get(me, 0) + 1
            self.holders.append(me)
        return got

    def release(self) -> None:
        self.inner.release()


class SliceRecorder:
    """Serves one real store to the sweeper and records, per ``expire`` call, what it reclaimed
    and how many times the store's lock was taken during the call."""

    def __init__(self, store: TTLStore[Any, Any], lock: CountingLock) -> None:
        self.store = store
        self.lock = lock
        self.slices: list[tuple[int, int]] = []  # (reclaimed, lock holds during the call)

    def expire(self, limit: int | None = None) -> int:
        me = threading.get_ident()
        before = self.lock.holds.get(me, 0)
        n = self.store.expire(limit)
        self.slices.append((n, self.lock.holds.get(me, 0) - before))
        return n


def backlog(clock: FakeClock, n: int) -> tuple[TTLStore[Any, int], CountingLock]:
    """A store with ``n`` due entries and one live key, its lock replaced by a CountingLock."""
    store = filled(clock, n)
    store.set("live", -1, ttl=None)
    clock.advance(11)
    lock = CountingLock(threading.Lock())  # the store is idle: a fresh lock stands in
    store._lock = lock
    return store, lock


def test_a_backlog_is_reclaimed_one_lock_hold_per_slice_of_at_most_batch(clock: FakeClock) -> None:
    store, lock = backlog(clock, 200_000)
    recorder = SliceRecorder(store, lock)
    sweeper = Sweeper(recorder, batch=1000)
    assert sweeper.sweep() == 200_000
    # Every expire() call held the store's lock exactly once and reclaimed at most one batch,
    # so a reader that asks for the lock during the sweep waits behind at most the slice that
    # holds it, never behind the backlog: the lock is free between two slices.
    assert all(holds == 1 for _, holds in recorder.slices)
    assert max(n for n, _ in recorder.slices) == 1000
    assert len(recorder.slices) == 201  # 200 full slices, then one that finds nothing
    assert sum(lock.holds.values()) == 201
    assert store.stats().expirations == 200_000
    assert store.peek("live") == -1


def test_readers_are_served_between_slices_while_a_backlog_is_swept(clock: FakeClock) -> None:
    store, lock = backlog(clock, 200_000)
    recorder = SliceRecorder(store, lock)
    sweeper = Sweeper(recorder, batch=1000)
    reading = threading.Event()
    done = threading.Event()
    answers: set[int | None] = set()
    reader_id: list[int] = []

    def reader() -> None:
        reader_id.append(threading.get_ident())
        while not done.is_set():
            answers.add(store.get("live"))
            reading.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        reading.wait(DEADLINE)
        sweeper_id = threading.get_ident()
        assert sweeper.sweep() == 200_000
    finally:
        done.set()
        thread.join(DEADLINE)
    assert set(answers) == {-1}
    assert all(holds == 1 for _, holds in recorder.slices)
    # The reader took the lock between the sweeper's first and last slice: it was not shut out
    # for the length of the backlog.
    holders = lock.holders
    first = holders.index(sweeper_id)
    last = len(holders) - 1 - holders[::-1].index(sweeper_id)
    assert reader_id[0] in holders[first:last]


async def test_async_sweeper_yields_to_the_loop_between_slices() -> None:
    store = FakeStore(pending=5_500)
    turns = 0
    seen: list[int] = []

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    real_expire = store.expire

    def expire(limit: int | None = None) -> int:
        seen.append(turns)
        return real_expire(limit)

    store.expire = expire  # type: ignore[method-assign]
    spinner = asyncio.ensure_future(other_task())
    await asyncio.sleep(0)
    try:
        assert await AsyncSweeper(store, batch=1000).sweep() == 5_500
    finally:
        spinner.cancel()
    assert store.calls == [1000] * 6
    # The other task ran between every two slices.
    assert all(b > a for a, b in itertools.pairwise(seen))


# ---------------------------------------------------------------------- acceptance 6: asyncio.run


def test_async_sweeper_inside_asyncio_run_stays_on_the_loop_thread(clock: FakeClock) -> None:
    fake = FakeStore(pending=4_200)
    real = filled(clock, 1_000)
    clock.advance(11)
    loops: set[int] = set()
    real_expire = fake.expire

    def expire(limit: int | None = None) -> int:
        loops.add(id(asyncio.get_running_loop()))  # raises off the loop's thread
        return real_expire(limit)

    fake.expire = expire  # type: ignore[method-assign]
    threads_before = set(threading.enumerate())

    async def main() -> AsyncSweeper:
        async with AsyncSweeper(fake, real, interval=FAST, batch=1000) as sweeper:
            assert sweeper.running
            await async_wait_for(
                lambda: fake.pending == 0 and sweeper.stats().per_store.get(id(real)) == 1_000
            )
            loops.add(id(asyncio.get_running_loop()))
        assert not sweeper.running
        return sweeper

    sweeper = asyncio.run(main())
    assert fake.threads == {threading.get_ident()}
    assert len(loops) == 1
    assert set(threading.enumerate()) == threads_before  # no executor, no helper thread
    calls = len(fake.calls)
    time.sleep(0.05)
    assert len(fake.calls) == calls  # stopped when the block exited
    assert not sweeper.running


async def test_async_sweeper_serves_stores_that_are_not_threadsafe(clock: FakeClock) -> None:
    store: TTLStore[int, int] = TTLStore(100, ttl=1, clock=clock, threadsafe=False)
    for i in range(50):
        store.set(i, i)
    clock.advance(2)
    async with AsyncSweeper(store, interval=FAST, batch=7) as sweeper:
        await async_wait_for(lambda: sweeper.stats().reclaimed == 50)


# ---------------------------------------------------------------------- add / discard


def test_add_and_discard_while_running(clock: FakeClock) -> None:
    first = filled(clock, 100, ttl=10)
    late = filled(clock, 100, ttl=10)
    with Sweeper(first, interval=FAST) as sweeper:
        assert first in sweeper and late not in sweeper
        sweeper.add(late)
        sweeper.add(late)  # again: nothing changes
        assert sweeper.stores == (first, late)
        sweeper.discard(first)
        sweeper.discard(first)  # not served: no-op
        sweeper.discard(FakeStore())
        assert list(sweeper.stores) == [late]
        ticks = sweeper.stats().ticks
        wait_for(lambda: sweeper.stats().ticks >= ticks + 2)  # no tick still holds the old list
        clock.advance(11)
        wait_for(lambda: sweeper.stats().per_store.get(id(late)) == 100)
        wait_for(lambda: sweeper.stats().ticks >= ticks + 5)
        assert sweeper.stats().reclaimed == 100
    # The discarded store was not swept: its entries are still stored, though invisible.
    assert "stored=100" in repr(first)
    assert first.expire() == 100


def test_discard_takes_effect_within_the_tick_in_progress() -> None:
    second = FakeStore(pending=10)
    sweeper = Sweeper()

    class Discarding:
        def expire(self, limit: int | None = None) -> int:
            sweeper.discard(second)
            return 0

    first = Discarding()
    sweeper.add(first)
    sweeper.add(second)
    assert sweeper.sweep() == 0
    assert second.calls == []


def test_store_is_added_again_after_its_id_is_reused() -> None:
    sweeper = Sweeper()
    for _ in range(100):
        store = FakeStore(pending=1)
        sweeper.add(store)
        assert store in sweeper
        assert sweeper.sweep() == 1
        assert sweeper.stats().per_store[id(store)] == 1
        del store


# ---------------------------------------------------------------------- stats


def test_stats_are_an_immutable_snapshot() -> None:
    store = FakeStore(pending=1_234)
    sweeper = Sweeper(store, batch=1000)
    before = sweeper.stats()
    assert before == SweeperStats(0, 0, 0, 0.0, {id(store): 0})
    sweeper.sweep()
    after = sweeper.stats()
    assert before.reclaimed == 0  # the old snapshot did not move
    assert after.ticks == 1
    assert after.reclaimed == 1_234
    assert after.per_store == {id(store): 1_234}
    assert after.last_tick_duration > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.ticks = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        after.per_store[id(store)] = 0  # type: ignore[index]
    hash(after)  # usable as a value


def test_protocol_accepts_ttlstore_and_look_alikes(clock: FakeClock) -> None:
    stores: list[Expirable] = [TTLStore(10, clock=clock), FakeStore()]
    assert Sweeper(*stores).stores == tuple(stores)


def test_repr_is_short() -> None:
    sweeper = Sweeper(FakeStore(), interval=60, batch=500)
    assert repr(sweeper) == "<Sweeper stores=1 interval=60 batch=500 running=False>"
    assert repr(AsyncSweeper()) == "<AsyncSweeper stores=0 interval=60 batch=1000 running=False>"


def test_async_stop_on_another_loop_is_refused_not_a_hang() -> None:
    sweeper = AsyncSweeper(interval=60)
    first = asyncio.new_event_loop()
    try:

        async def begin() -> None:
            sweeper.start()

        first.run_until_complete(begin())
        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(asyncio.wait_for(sweeper.stop(), 5))
        assert sweeper.running
        first.run_until_complete(sweeper.stop())
        assert not sweeper.running
    finally:
        first.close()
