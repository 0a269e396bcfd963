"""@cached on async functions and aget_or_set: single flight over tasks, cancellation, loops."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from ttlstore import TTLStore, aget_or_set, cached
from ttlstore.testing import FakeClock


async def _until(condition: Callable[[], bool], rounds: int = 10_000) -> None:
    """Let the loop run until ``condition()`` holds (tasks reaching a point, not timing)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_an_async_function_stays_a_coroutine_function() -> None:
    @cached(ttl=5)
    async def fetch(x: int) -> int:
        return x

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.iscoroutinefunction(fetch)


async def test_hits_misses_and_expiry(clock: FakeClock) -> None:
    calls = []

    @cached(ttl=10, clock=clock)
    async def fetch(x: int, *, scale: int = 1) -> int:
        calls.append(x)
        return x * scale

    assert await fetch(2) == 2
    assert await fetch(2, scale=1) == 2
    assert await fetch(2, scale=3) == 6
    clock.advance(10)
    assert await fetch(2) == 2
    assert calls == [2, 2, 2]
    info = fetch.cache_info()
    assert (info.hits, info.misses) == (1, 3)
    assert fetch.cache_invalidate(2)
    with pytest.raises(TypeError, match=r"fetch\(\) got an unhashable argument"):
        unhashable: Any = [2]
        await fetch(unhashable)


async def test_1000_tasks_missing_one_key_cause_one_call(clock: FakeClock) -> None:
    release = asyncio.Event()
    calls = []

    @cached(ttl=60, clock=clock)
    async def load(key: str) -> str:
        calls.append(key)
        await release.wait()
        return key.upper()

    tasks = [asyncio.create_task(load("k")) for _ in range(1000)]
    await _until(lambda: load.cache_info().misses == 1000)
    release.set()
    assert await asyncio.gather(*tasks) == ["K"] * 1000
    assert calls == ["k"]
    assert await load("k") == "K"
    assert load.cache_info().hits == 1


async def test_an_exception_reaches_every_waiter_and_is_not_cached() -> None:
    release = asyncio.Event()
    attempts = []

    @cached(ttl=60)
    async def flaky(x: int) -> int:
        attempts.append(x)
        await release.wait()
        if len(attempts) == 1:
            raise ConnectionError("backend down")
        return x

    tasks = [asyncio.create_task(flaky(1)) for _ in range(50)]
    await _until(lambda: flaky.cache_info().misses == 50)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert attempts == [1]
    assert await flaky(1) == 1
    assert attempts == [1, 1]


async def test_self_recursion_is_an_error_not_a_deadlock() -> None:
    @cached
    async def loop(x: int) -> int:
        return await loop(x) + 1

    with pytest.raises(RuntimeError, match=r"loop\(\) asked for its own key \(1,\)"):
        await asyncio.wait_for(loop(1), timeout=10)


async def test_cancelling_one_waiter_leaves_the_call_running_for_the_others() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    observed: list[str] = []

    @cached
    async def slow(x: int) -> int:
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            observed.append("cancelled")
            raise
        observed.append("finished")
        return x * 10

    first = asyncio.create_task(slow(1))
    second = asyncio.create_task(slow(1))
    await started.wait()
    await _until(lambda: slow.cache_info().misses == 2)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == 10
    assert observed == ["finished"]  # the body never saw the first caller's cancellation
    assert await slow(1) == 10  # and its result was stored
    assert slow.cache_info().misses == 2


async def test_cancelling_every_waiter_cancels_the_call() -> None:
    started = asyncio.Event()
    observed: list[str] = []

    @cached
    async def slow(x: int) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            observed.append("cancelled")
            raise
        return x

    tasks = [asyncio.create_task(slow(1)) for _ in range(3)]
    await started.wait()
    await _until(lambda: slow.cache_info().misses == 3)
    for task in tasks[:2]:
        task.cancel()
    await asyncio.gather(*tasks[:2], return_exceptions=True)
    await asyncio.sleep(0)
    assert observed == []  # one waiter is left
    tasks[2].cancel()
    await asyncio.gather(tasks[2], return_exceptions=True)
    await _until(lambda: observed == ["cancelled"])
    assert slow.cache_info().currsize == 0


async def test_a_caller_arriving_after_all_cancelled_starts_afresh() -> None:
    started = asyncio.Event()
    runs = []

    @cached
    async def slow(x: int) -> int:
        runs.append(x)
        started.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return x

    task = asyncio.create_task(slow(1))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await slow(1) == 1  # not the cancelled flight: a new one
    assert runs == [1, 1]


def test_two_event_loops_one_after_the_other() -> None:
    calls = []

    @cached(ttl=60)
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0)
        return x + 1

    async def burst(x: int) -> list[int]:
        return await asyncio.gather(*(fetch(x) for _ in range(20)))

    assert asyncio.run(burst(1)) == [2] * 20
    assert asyncio.run(burst(1)) == [2] * 20  # a hit, computed on the first loop
    assert asyncio.run(burst(2)) == [3] * 20
    assert calls == [1, 2]


def test_a_flight_left_on_a_closed_loop_does_not_block_the_next_loop() -> None:
    @cached(ttl=60)
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        return x

    first = asyncio.new_event_loop()
    started = first.create_task(fetch(1))
    first.run_until_complete(asyncio.sleep(0))  # the flight is on its way
    first.close()  # without finishing it
    assert asyncio.run(fetch(1)) == 1
    del started
    gc.collect()


def test_two_threads_each_with_its_own_loop() -> None:
    barrier = threading.Barrier(2)
    calls = []
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    @cached(ttl=60)
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.01)
        return x * 2

    async def burst() -> list[int]:
        return await asyncio.gather(*(fetch(7) for _ in range(100)))

    def worker(index: int) -> None:
        try:
            barrier.wait(10)
            results[index] = asyncio.run(burst())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == {0: [14] * 100, 1: [14] * 100}
    assert 1 <= len(calls) <= 2  # one flight per loop at most: no loop awaits another's task


async def test_stale_serves_the_old_value_while_one_refresh_task_runs(clock: FakeClock) -> None:
    release = asyncio.Event()
    version = [0]

    @cached(ttl=10, stale=5, clock=clock)
    async def fetch(x: int) -> tuple[int, int]:
        version[0] += 1
        if version[0] > 1:
            await release.wait()
        return x, version[0]

    assert await fetch(1) == (1, 1)
    clock.advance(11)
    for _ in range(50):
        assert await fetch(1) == (1, 1)  # at once: no await of the refresh
    await _until(lambda: version[0] == 2)
    assert fetch.cache_info().refreshes == 1
    release.set()
    await _until(lambda: fetch.cache_info().currsize == 1 and version[0] == 2)
    for _ in range(100):
        if await fetch(1) == (1, 2):
            break
        await asyncio.sleep(0)
    assert await fetch(1) == (1, 2)
    assert version[0] == 2
    info = fetch.cache_info()
    assert (info.refreshes, info.refresh_errors, info.misses) == (1, 0, 1)


async def test_a_failed_refresh_task_is_logged_and_the_old_value_kept(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fail = [False]

    @cached(ttl=10, stale=5, clock=clock)
    async def fetch(x: int) -> str:
        if fail[0]:
            raise ConnectionError("upstream down")
        return "old"

    assert await fetch(1) == "old"
    fail[0] = True
    clock.advance(10)
    with caplog.at_level(logging.ERROR, logger="ttlstore"):
        assert await fetch(1) == "old"
        await _until(lambda: fetch.cache_info().refresh_errors == 1)
    assert "upstream down" in caplog.text
    clock.advance(4.999)
    assert await fetch(1) == "old"
    assert fetch.cache_info().refreshes == 1
    clock.advance(0.001)
    with pytest.raises(ConnectionError):
        await fetch(1)


class Client:
    def __init__(self, name: str) -> None:
        self.name = name

    @cached(ttl=60)
    async def get(self, path: str) -> str:
        await asyncio.sleep(0)
        return f"{self.name}{path}"


async def test_async_methods_do_not_keep_instances_alive() -> None:
    client = Client("a")
    assert await client.get("/x") == "a/x"
    assert await Client("b").get("/x") == "b/x"
    ref = weakref.ref(client)
    del client
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------- aget_or_set


async def test_aget_or_set_single_flight_and_ttl(clock: FakeClock) -> None:
    store: TTLStore[str, int] = TTLStore(10, ttl=30, clock=clock)
    release = asyncio.Event()
    calls = []

    async def factory() -> int:
        calls.append(1)
        await release.wait()
        return 42

    tasks = [asyncio.create_task(aget_or_set(store, "k", factory)) for _ in range(100)]
    await _until(lambda: len(calls) == 1)
    for _ in range(10):
        await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == [42] * 100
    assert calls == [1]
    assert store.ttl("k") == 30
    assert await aget_or_set(store, "own", factory, ttl=5) == 42
    assert store.ttl("own") == 5
    assert await aget_or_set(store, "k", factory) == 42
    assert calls == [1, 1]


async def test_aget_or_set_cancellation_rules() -> None:
    store: TTLStore[str, int] = TTLStore(10)
    started = asyncio.Event()
    observed: list[str] = []

    async def factory() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            observed.append("cancelled")
            raise
        return 1

    one = asyncio.create_task(aget_or_set(store, "k", factory))
    two = asyncio.create_task(aget_or_set(store, "k", factory))
    await started.wait()
    await asyncio.sleep(0)
    one.cancel()
    await asyncio.gather(one, return_exceptions=True)
    await asyncio.sleep(0)
    assert observed == []
    two.cancel()
    await asyncio.gather(two, return_exceptions=True)
    await _until(lambda: observed == ["cancelled"])
    assert "k" not in store


async def test_aget_or_set_refuses_what_is_not_awaitable() -> None:
    store: TTLStore[str, int] = TTLStore(10)
    with pytest.raises(TypeError, match="factory must return an awaitable, got 5"):
        await aget_or_set(store, "k", lambda: 5)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="store must be a TTLStore"):
        await aget_or_set({}, "k", asyncio.sleep)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory must be callable"):
        await aget_or_set(store, "k", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl must be"):
        await aget_or_set(store, "k", asyncio.sleep, ttl=-1)  # type: ignore[arg-type]
    assert "k" not in store


async def test_aget_or_set_exception_is_not_stored() -> None:
    store: TTLStore[str, int] = TTLStore(10)

    async def boom() -> int:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        await aget_or_set(store, "k", boom)
    assert len(store) == 0


async def test_aget_or_set_recursion_is_an_error() -> None:
    store: TTLStore[str, int] = TTLStore(10)

    async def again() -> int:
        return await aget_or_set(store, "k", again)

    with pytest.raises(RuntimeError, match="asked for its own key 'k'"):
        await asyncio.wait_for(aget_or_set(store, "k", again), timeout=10)


def test_aget_or_set_flights_do_not_keep_a_store_alive() -> None:
    store: TTLStore[str, int] = TTLStore(10)

    async def one() -> int:
        return 1

    assert asyncio.run(aget_or_set(store, "k", one)) == 1
    ref = weakref.ref(store)
    del store
    gc.collect()
    assert ref() is None
